"""Tokenizer from a checkpoint folder, and prompt encoding with the model's chat template."""
import warnings
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging


def load_tokenizer(path: str | Path):
    # AutoTokenizer also reads config.json and warns about fields it does not know (model_type
    # "llada", rope_scaling); the tokenizer files alone define the tokenizer, so that is noise here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(path))
    finally:
        logging.set_verbosity(verbosity)


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of `text` as one user turn followed by the assistant header (when `chat` and the
    tokenizer has a chat template), else of the plain text. The template already writes BOS, so
    the tokenizer adds no special tokens of its own in chat mode."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
