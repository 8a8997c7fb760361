"""Dense LLaDA (GSAI-ML/LLaDA-8B-{Base,Instruct}, LLaDA-1.5): a Llama-style pre-norm decoder
used as a bidirectional mask predictor.

    h   = x + attn_out(SDPA(rope(q), rope(k), v))     q, k, v from attn_norm(x), no causal mask
    out = h + ff_out(silu(ff_proj(n)) * up_proj(n))   n = ff_norm(h)

RoPE is rotate-half with frequencies in fp32; RMSNorm statistics in fp32; untied LM head.
Logits are not shifted: position i predicts token i. Checkpoint names (prefix
`model.transformer.`) are mapped in `checkpoint_map`; mind the traps there.
"""
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from difuse.models.layers import RMSNorm, attention, rope_cos_sin
from difuse.models.packing import Cat, Source
from difuse.patterns.rope import apply_rope
from difuse.patterns.swiglu import swiglu_fused


# Settings of the OLMo-style config that this implementation does not cover, with the value LLaDA
# uses; a checkpoint asking for anything else is refused rather than silently computed differently.
FIXED_SETTINGS = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "bias_for_layer_norm": False, "include_bias": False,
    "include_qkv_bias": False, "attention_layer_norm": False, "weight_tying": False,
    "alibi": False, "rope": True, "scale_logits": False, "input_emb_norm": False,
    "block_group_size": 1,
}


@dataclass(slots=True)
class LLaDAConfig:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    pad_token_id: int | None = None
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.embedding_size:
                raise ValueError(f"{name} {token} is outside the vocabulary [0, {self.embedding_size})")

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LLaDAConfig":
        for key, value in FIXED_SETTINGS.items():
            if key in hf and hf[key] is not None and hf[key] != value:
                raise ValueError(f"unsupported LLaDA config: {key}={hf[key]!r} (only {value!r})")
        missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id", "eos_token_id")
                   if hf.get(k) is None]
        if missing:
            raise ValueError(f"LLaDA config.json lacks required fields {missing}")
        names = [f.name for f in fields(cls) if f.init]
        return cls(**{k: hf[k] for k in names if hf.get(k) is not None})


class Attention(nn.Module):
    def __init__(self, config: LLaDAConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q_proj, k_proj, v_proj stacked row-wise: one GEMM
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache, attention_bias):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # [B, T, Hq, D]
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        self.layer_index, cache, attention_bias)  # [B, Hq, T, D]
        return self.attn_out(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, Hq * D]


class MLP(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        # ff_proj (gate) and up_proj stacked row-wise: one GEMM
        self.gate_up = nn.Linear(config.d_model, 2 * config.mlp_hidden_size, bias=False)
        self.down = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(self, x):
        return self.down(swiglu_fused(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, config: LLaDAConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, cache, attention_bias):
        """Returns (this block's output delta, residual stream before it): the caller's next
        norm adds them, so every residual add is fused with the norm that follows it."""
        if residual is None:
            x, residual = self.attn_norm(x), x
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.attn(x, cos, sin, cache, attention_bias)
        x, residual = self.ff_norm(x, residual)
        return self.mlp(x), residual


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids, positions, cache=None, inputs_embeds=None, attention_bias=None):
        """input_ids, positions: int64 [B, T] (or inputs_embeds [B, T, d_model] instead of ids)
        -> final-normed hidden states [B, T, d_model] in the model dtype."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        residual = None
        for block in self.blocks:
            x, residual = block(x, residual, cos, sin, cache, attention_bias)
        return self.ln_f(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d_model] -> logits [..., embedding_size] in the model dtype."""
        return self.lm_head(hidden)


def checkpoint_map(config: LLaDAConfig, checkpoint_keys: set[str]) -> dict[str, Source]:
    """Our parameter name -> where it comes from in the HF checkpoint.

    Naming traps: `ff_proj` is the gate (through SiLU), not the up projection; `ff_out` is both
    the per-block down projection and the top-level LM head."""
    D, Hq, Hkv, I = config.head_dim, config.n_heads, config.n_kv_heads, config.mlp_hidden_size
    hf = "model.transformer."
    names = {"wte.weight": hf + "wte.weight", "ln_f.weight": hf + "ln_f.weight", "lm_head.weight": hf + "ff_out.weight"}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"{hf}blocks.{i}."
        names[ours + "attn_norm.weight"] = theirs + "attn_norm.weight"
        names[ours + "ff_norm.weight"] = theirs + "ff_norm.weight"
        names[ours + "attn.qkv.weight"] = Cat(
            (theirs + "q_proj.weight", theirs + "k_proj.weight", theirs + "v_proj.weight"), (Hq * D, Hkv * D, Hkv * D)
        )
        names[ours + "attn.attn_out.weight"] = theirs + "attn_out.weight"
        names[ours + "mlp.gate_up.weight"] = Cat((theirs + "ff_proj.weight", theirs + "up_proj.weight"), (I, I))
        names[ours + "mlp.down.weight"] = theirs + "ff_out.weight"
    return names
