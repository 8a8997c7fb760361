"""A character-level tokenizer in LLaDA's format, for small checkpoints trained from scratch.

Every character is one token (so every digit is its own token, which is what makes arithmetic
learnable by a small model), plus LLaDA's special tokens and chat template. Written as
tokenizer.json + tokenizer_config.json, loadable by transformers.AutoTokenizer.
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

EOS, BOS, MASK = "<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
PAD, UNK = "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (EOS, BOS, MASK, START_HEADER, END_HEADER, EOT, PAD, UNK)
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))  # newline + printable ASCII

# LLaDA's chat template: BOS, then per turn `<|start_header_id|>role<|end_header_id|>\n\n content<|eot_id|>`,
# then the assistant header when a reply is wanted.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

VOCAB = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
VOCAB_SIZE = len(VOCAB)
EOS_ID, BOS_ID, MASK_ID, PAD_ID = VOCAB[EOS], VOCAB[BOS], VOCAB[MASK], VOCAB[PAD]


def build_char_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters are joined without separators
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def save_char_tokenizer(folder: str | Path, model_max_length: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": MASK,
        "additional_special_tokens": [START_HEADER, END_HEADER, EOT],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "padding_side": "left",  # LLaDA's generate.py pads prompts on the left
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
