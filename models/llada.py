"""Dense LLaDA (GSAI-ML/LLaDA-8B-{Base,Instruct}, LLaDA-1.5): a Llama-style pre-norm decoder
used as a bidirectional mask predictor.

    h   = x + attn_out(SDPA(rope(q), rope(k), v))     q, k, v from attn_norm(x), no causal mask
    out = h + ff_out(silu(ff_proj(n)) * up_proj(n))   n = ff_norm(h)

RoPE is rotate-half with frequencies in fp32; RMSNorm statistics in fp32; untied LM head.
Logits are not shifted: position i predicts token i. Checkpoint names (prefix
`model.transformer.`) are mapped in `checkpoint_map`; mind the traps there.
"""
from dataclasses import dataclass, field

from difuse.models.hf_config import check_head_counts, check_special_tokens, config_from_hf
from difuse.models.layers import Attention, DecoderLayer, DecoderModel, SwiGLUMLP
from difuse.models.packing import Cat, Source


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
        check_head_counts(self.n_heads, self.n_kv_heads)
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        check_special_tokens(self, self.embedding_size)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LLaDAConfig":
        return config_from_hf(cls, hf, "LLaDA", FIXED_SETTINGS)


class LLaDAModel(DecoderModel):
    def __init__(self, config: LLaDAConfig):
        c = config
        layers = [
            DecoderLayer(c.d_model, c.rms_norm_eps,
                         Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, layer_index=i),
                         SwiGLUMLP(c.d_model, c.mlp_hidden_size))
            for i in range(c.n_layers)
        ]
        super().__init__(c, c.embedding_size, c.d_model, c.rms_norm_eps, c.head_dim, c.rope_theta, layers)


def checkpoint_map(config: LLaDAConfig, checkpoint_keys: set[str]) -> dict[str, Source]:
    """Our parameter name -> where it comes from in the HF checkpoint.

    Naming traps: `ff_proj` is the gate (through SiLU), not the up projection; `ff_out` is both
    the per-block down projection and the top-level LM head."""
    D, Hq, Hkv, I = config.head_dim, config.n_heads, config.n_kv_heads, config.mlp_hidden_size
    hf = "model.transformer."
    names = {"embed_tokens.weight": hf + "wte.weight", "norm.weight": hf + "ln_f.weight",
             "lm_head.weight": hf + "ff_out.weight"}
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"{hf}blocks.{i}."
        names |= {
            ours + "attn_norm.weight": theirs + "attn_norm.weight",
            ours + "attn.qkv.weight": Cat((theirs + "q_proj.weight", theirs + "k_proj.weight", theirs + "v_proj.weight"),
                                          (Hq * D, Hkv * D, Hkv * D)),
            ours + "attn.out.weight": theirs + "attn_out.weight",
            ours + "ffn_norm.weight": theirs + "ff_norm.weight",
            ours + "ffn.gate_up.weight": Cat((theirs + "ff_proj.weight", theirs + "up_proj.weight"), (I, I)),
            ours + "ffn.down.weight": theirs + "ff_out.weight",
        }
    return names
