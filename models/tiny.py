"""Tiny random checkpoints in the real HF format, for tests and demos.

`make_tiny_checkpoint(path, kind)` writes config.json with the family's real field names,
model.safetensors (or shards plus model.safetensors.index.json) with the real tensor names, and
a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with the family's chat
template) that transformers.AutoTokenizer loads. Same seed, same files.

Tokenizer ids: 0..255 are the bytes (GPT-2 byte-level alphabet, no merges, so any text round
trips), followed by the family's special tokens (see SPECIAL_TOKENS); the model vocabulary is
larger than the tokenizer, as in the real checkpoints.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Ling / Bailing format shared by LLaDA-MoE and LLaDA2: <role>HUMAN</role>...<|role_end|>.
LING_CHAT_TEMPLATE = (
    "{% set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} %}"
    "{% for message in messages %}"
    "{{ '<role>' + names[message['role']] + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)

# Special tokens in id order, starting right after the 256 byte tokens, and their roles.
LLADA_SPECIAL_TOKENS = [
    ("<|startoftext|>", "bos"), ("<|endoftext|>", "eos"), ("<|mdm_mask|>", "mask"),
    ("<|start_header_id|>", None), ("<|end_header_id|>", None), ("<|eot_id|>", None),
]
LING_SPECIAL_TOKENS = [
    ("<|startoftext|>", "bos"), ("<|endoftext|>", "eos"), ("<|mask|>", "mask"),
    ("<role>", None), ("</role>", None), ("<|role_end|>", None),
]
SPECIAL_TOKENS = {"llada": LLADA_SPECIAL_TOKENS, "llada_moe": LING_SPECIAL_TOKENS, "llada2": LING_SPECIAL_TOKENS}
CHAT_TEMPLATES = {"llada": LLADA_CHAT_TEMPLATE, "llada_moe": LING_CHAT_TEMPLATE, "llada2": LING_CHAT_TEMPLATE}


def _llada_config(special: dict[str, int]) -> dict:
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 96, "mlp_ratio": 4,
        "vocab_size": 320, "embedding_size": 320, "max_sequence_length": 512,
        "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
        "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rms_norm_eps": 1e-5,
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "include_bias": False,
        "include_qkv_bias": False, "attention_layer_norm": False, "weight_tying": False, "alibi": False,
        "flash_attention": False, "scale_logits": False, "input_emb_norm": False, "block_group_size": 1,
        "mask_token_id": special["mask"], "eos_token_id": special["eos"], "pad_token_id": special["eos"],
        "use_cache": False, "init_device": "meta", "precision": "amp_bf16",
    }


def _llada_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, head_dim, inner = c["d_model"], c["d_model"] // c["n_heads"], c["mlp_hidden_size"]
    kv = c["n_kv_heads"] * head_dim
    shapes = {
        "model.transformer.wte.weight": (c["embedding_size"], d),
        "model.transformer.ln_f.weight": (d,),
        "model.transformer.ff_out.weight": (c["embedding_size"], d),
    }
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
            p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d),
            p + "attn_out.weight": (d, d),
            p + "ff_proj.weight": (inner, d), p + "up_proj.weight": (inner, d), p + "ff_out.weight": (d, inner),
        }
    return shapes


def _llada_moe_config(special: dict[str, int]) -> dict:
    return {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe",
        "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
        "rope_theta": 50000.0, "partial_rotary_factor": 1.0, "rope_scaling": None, "attention_bias": False,
        "clip_qkv": None, "qk_layernorm": True,
        "num_experts": 8, "num_experts_per_tok": 3, "expert_intermediate_size": 32, "dense_intermediate_size": 96,
        "shared_expert_intermediate_size": None, "moe_layer_freq": [1, 1], "norm_topk_prob": False,
        "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
        "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "mask_token_id": special["mask"], "eos_token_id": special["eos"], "pad_token_id": special["eos"],
    }


def _llada_moe_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    H, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    D = H // heads
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "model.norm.weight": (H,),
              "lm_head.weight": (c["vocab_size"], H)}
    for i, moe in enumerate(c["moe_layer_freq"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (heads * D, H), p + "self_attn.k_proj.weight": (kv_heads * D, H),
            p + "self_attn.v_proj.weight": (kv_heads * D, H), p + "self_attn.o_proj.weight": (H, heads * D),
        }
        if c["qk_layernorm"]:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        if not moe:
            shapes |= _swiglu_shapes(p + "mlp.", H, c["dense_intermediate_size"])
            continue
        shapes[p + "mlp.gate.weight"] = (c["num_experts"], H)
        if c["moe_router_enable_expert_bias"]:
            shapes[p + "mlp.expert_bias"] = (c["num_experts"],)
        for e in range(c["num_experts"]):
            shapes |= _swiglu_shapes(f"{p}mlp.experts.{e}.", H, c["expert_intermediate_size"])
        if c["shared_expert_intermediate_size"]:
            shapes |= _swiglu_shapes(p + "shared_expert.", H, c["shared_expert_intermediate_size"])
    return shapes


def _llada2_config(special: dict[str, int]) -> dict:
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
        "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "intermediate_size": 96,
        "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True, "norm_head": False, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "rope_theta": 600000.0, "partial_rotary_factor": 0.5, "rope_scaling": None,
        "num_experts": 16, "num_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "moe_intermediate_size": 16, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "router_dtype": "fp32",
        "norm_topk_prob": True, "tie_word_embeddings": False,
        "mask_token_id": special["mask"], "eos_token_id": special["eos"], "pad_token_id": special["eos"],
    }


def _llada2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    H, heads, kv_heads, D = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, I = c["num_experts"], c["moe_intermediate_size"]
    shapes = {"model.word_embeddings.weight": (c["vocab_size"], H), "model.norm.weight": (H,),
              "lm_head.weight": (c["vocab_size"], H)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "attention.query_key_value.weight": ((heads + 2 * kv_heads) * D, H),
            p + "attention.dense.weight": (H, heads * D),
        }
        if c["use_qk_norm"]:
            shapes |= {p + "attention.query_layernorm.weight": (D,), p + "attention.key_layernorm.weight": (D,)}
        if i < c["first_k_dense_replace"]:
            shapes |= _swiglu_shapes(p + "mlp.", H, c["intermediate_size"])
            continue
        shapes[p + "mlp.gate.weight"] = (E, H)
        shapes[p + "mlp.gate.expert_bias"] = (E,)
        for e in range(E):
            shapes |= _swiglu_shapes(f"{p}mlp.experts.{e}.", H, I)
        if c["num_shared_experts"]:
            shapes |= _swiglu_shapes(p + "mlp.shared_experts.", H, I * c["num_shared_experts"])
    return shapes


def _swiglu_shapes(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inner, hidden), prefix + "up_proj.weight": (inner, hidden),
            prefix + "down_proj.weight": (hidden, inner)}


KINDS = {
    "llada": (_llada_config, _llada_shapes),
    "llada_moe": (_llada_moe_config, _llada_moe_shapes),
    "llada2": (_llada2_config, _llada2_shapes),
}


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Norm weights near 1, embeddings ~ N(0, 1), matrices scaled by 1/sqrt(fan_in) so the
    activations stay O(1) through the layers and every weight visibly affects the output."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(shapes):
        shape = shapes[key]
        w = torch.randn(shape, generator=generator)
        if key.endswith("expert_bias"):
            w = 0.05 * w  # comparable to the spread of router probabilities: it changes choices
        elif len(shape) == 1:  # norm weights
            w = 1.0 + 0.1 * w
        elif not key.endswith(("wte.weight", "embed_tokens.weight", "word_embeddings.weight")):
            w = w / shape[-1] ** 0.5
        weights[key] = w.to(dtype).contiguous()
    return weights


def _write_weights(path: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(weights)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: weights[k] for k in keys[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, path / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in chunk}
    total = sum(w.numel() * w.element_size() for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _byte_symbols() -> list[str]:
    """The byte-level pre-tokenizer's symbol for each byte value 0..255 (printable bytes stand
    for themselves, the rest are shifted to 256+), so token id == byte value."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    assert set(symbols) == set(ByteLevel.alphabet())
    return symbols


def _write_tokenizer(path: Path, kind: str) -> dict[str, int]:
    """Writes tokenizer.json / tokenizer_config.json; returns {role: id} of the special tokens."""
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(_byte_symbols())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS[kind]
    tokenizer.add_special_tokens([token for token, _ in specials])
    tokenizer.save(str(path / "tokenizer.json"))

    ids = {token: tokenizer.token_to_id(token) for token, _ in specials}
    roles = {role: ids[token] for token, role in specials if role}
    by_role = {role: token for token, role in specials if role}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": by_role.get("bos"), "eos_token": by_role["eos"], "pad_token": by_role["eos"],
        "mask_token": by_role["mask"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "chat_template": CHAT_TEMPLATES[kind],
    }
    (path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
    return roles


def make_tiny_checkpoint(path: str | Path, kind: str = "llada", seed: int = 0, shards: int = 1,
                         dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    """Write a tiny random `kind` checkpoint into `path` (created if needed) and return the path.
    `overrides` replace config.json fields (e.g. n_layers=3)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_config, make_shapes = KINDS[kind]
    special = _write_tokenizer(path, kind)
    config = make_config(special)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown {kind} config fields {unknown}; known: {sorted(config)}")
    if kind == "llada_moe" and "num_hidden_layers" in overrides and "moe_layer_freq" not in overrides:
        config["moe_layer_freq"] = [1] * overrides["num_hidden_layers"]  # every layer MoE, as the real model
    config |= overrides
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(path, _random_weights(make_shapes(config), seed, dtype), shards)
    return path
