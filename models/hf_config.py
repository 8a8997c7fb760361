"""What the model families' config dataclasses share: building one from an HF config.json, refusing
settings we do not compute, and the checks on head counts, rotary width and special token ids."""
from dataclasses import MISSING, fields


def config_from_hf(cls, hf: dict, family: str, fixed: dict):
    """cls built from the config.json dict `hf`: every init field hf names (None counts as unnamed);
    a setting of `fixed` that hf names with another value is refused, as is a required field it lacks."""
    for key, value in fixed.items():
        if hf.get(key) is not None and hf[key] != value:
            raise ValueError(f"unsupported {family} config: {key}={hf[key]!r} (only {value!r})")
    init = [f for f in fields(cls) if f.init]
    missing = [f.name for f in init if f.default is MISSING and f.default_factory is MISSING
               and hf.get(f.name) is None]
    if missing:
        raise ValueError(f"{family} config.json lacks required fields {missing}")
    return cls(**{f.name: hf[f.name] for f in init if hf.get(f.name) is not None})


def check_head_counts(num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")


def rotary_dim_of(head_dim: int, partial_rotary_factor: float) -> int:
    """The rotated leading dims of a head: even and within the head."""
    rotary_dim = int(head_dim * partial_rotary_factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"partial_rotary_factor {partial_rotary_factor} gives rotary dim {rotary_dim}; "
                         f"it must be even and within head_dim {head_dim}")
    return rotary_dim


def check_special_tokens(config, vocab_size: int) -> None:
    for name in ("mask_token_id", "eos_token_id"):
        token = getattr(config, name)
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} {token} is outside the vocabulary [0, {vocab_size})")
