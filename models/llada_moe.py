"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*): an OLMoE-style decoder used bidirectionally.

    h   = x + o_proj(SDPA(rope(q_norm(q)), rope(k_norm(k)), v))   per-head QK RMSNorm, no mask
    out = h + sum_top-k p_e * expert_e(n) [+ shared_expert(n)]      n = post_attention_norm(h)
    p   = top-k of softmax(gate(n)) (+ expert bias), not renormalised

Layers whose `moe_layer_freq` entry is 0 use a dense SwiGLU MLP instead. RoPE is rotate-half,
partial when partial_rotary_factor < 1. Checkpoints come either with one tensor per expert (HF
format, stacked at load) or with experts already stacked as `mlp.w1` [E, 2I, H] / `mlp.w2`
[E, H, I] (dInfer's fused format).
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from difuse.models.hf_config import check_head_counts, check_special_tokens, config_from_hf, rotary_dim_of
from difuse.models.layers import Attention, DecoderLayer, DecoderModel, SwiGLUMLP
from difuse.models.moe import Experts, softmax_topk_router
from difuse.models.packing import Cat, Source, expert_sources, swiglu_sources

# Ling tokenizer ids, used when config.json does not name them.
DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


@dataclass(slots=True)
class LLaDAMoEConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    num_key_value_heads: int | None = None
    dense_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    moe_layer_freq: list[int] | int = 1
    moe_router_enable_expert_bias: bool = False
    moe_router_score_function: str = "softmax"
    qk_layernorm: bool = True
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    eos_token_id: int = DEFAULT_EOS_TOKEN_ID
    pad_token_id: int | None = None
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)
    moe_layers: tuple[bool, ...] = field(init=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        check_head_counts(self.num_attention_heads, self.num_key_value_heads)
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = rotary_dim_of(self.head_dim, self.partial_rotary_factor)
        if isinstance(self.moe_layer_freq, int):
            if self.moe_layer_freq != 1:
                raise ValueError(f"integer moe_layer_freq must be 1 (every layer MoE), got {self.moe_layer_freq}")
            self.moe_layers = (True,) * self.num_hidden_layers
        else:
            if len(self.moe_layer_freq) != self.num_hidden_layers:
                raise ValueError(f"moe_layer_freq has {len(self.moe_layer_freq)} entries for "
                                 f"{self.num_hidden_layers} layers")
            self.moe_layers = tuple(bool(flag) for flag in self.moe_layer_freq)
        if not all(self.moe_layers) and self.dense_intermediate_size is None:
            raise ValueError("dense layers in moe_layer_freq need dense_intermediate_size")
        if self.moe_router_score_function != "softmax":
            raise ValueError(f"unsupported moe_router_score_function {self.moe_router_score_function!r} (only 'softmax')")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in [1, {self.num_experts}]")
        check_special_tokens(self, self.vocab_size)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LLaDAMoEConfig":
        # norm_topk_prob, routed_scaling_factor and router groups appear in config.json but the
        # reference HF code never applies them (norm_topk_prob is hard-coded False there).
        fixed = {"attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu", "rope_scaling": None}
        return config_from_hf(cls, hf, "LLaDA-MoE", fixed)


class SparseMoE(nn.Module):
    def __init__(self, c: LLaDAMoEConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.expert_bias = nn.Parameter(torch.zeros(c.num_experts)) if c.moe_router_enable_expert_bias else None
        self.experts = Experts(c.num_experts, c.hidden_size, c.expert_intermediate_size)
        self.shared_expert = (SwiGLUMLP(c.hidden_size, c.shared_expert_intermediate_size)
                              if c.shared_expert_intermediate_size else None)

    def forward(self, x):
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        weights, ids = softmax_topk_router(self.gate(flat), self.top_k, self.expert_bias)  # [N, K]
        out = self.experts(flat, weights, ids)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(B, T, H)


class LLaDAMoEModel(DecoderModel):
    # The router bias shifts fp32 softmax probabilities by small amounts: bf16 would erase them.
    FP32_PARAMETERS = ("expert_bias",)

    def __init__(self, config: LLaDAMoEConfig):
        c = config
        qk_eps = c.rms_norm_eps if c.qk_layernorm else None
        layers = [
            DecoderLayer(
                c.hidden_size, c.rms_norm_eps,
                Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                          layer_index=i, qk_norm_eps=qk_eps, clip_qkv=c.clip_qkv),
                SparseMoE(c) if c.moe_layers[i] else SwiGLUMLP(c.hidden_size, c.dense_intermediate_size),
            )
            for i in range(c.num_hidden_layers)
        ]
        super().__init__(c, c.vocab_size, c.hidden_size, c.rms_norm_eps, c.rotary_dim, c.rope_theta, layers)


def checkpoint_map(config: LLaDAMoEConfig, checkpoint_keys: set[str]) -> dict[str, Source]:
    c = config
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    fused_experts = any(key.endswith(".mlp.w1") for key in checkpoint_keys)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(c.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        names |= {
            ours + "attn_norm.weight": theirs + "input_layernorm.weight",
            ours + "attn.qkv.weight": Cat((attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                                          (Hq * D, Hkv * D, Hkv * D)),
            ours + "attn.out.weight": attn + "o_proj.weight",
            ours + "ffn_norm.weight": theirs + "post_attention_layernorm.weight",
        }
        if c.qk_layernorm:
            names[ours + "attn.q_norm.weight"] = attn + "q_norm.weight"
            names[ours + "attn.k_norm.weight"] = attn + "k_norm.weight"
        mlp = theirs + "mlp."
        if not c.moe_layers[i]:
            names |= swiglu_sources(ours + "ffn.", mlp, c.dense_intermediate_size)
            continue
        names[ours + "ffn.gate.weight"] = mlp + "gate.weight"
        if c.moe_router_enable_expert_bias:
            names[ours + "ffn.expert_bias"] = mlp + "expert_bias"
        names |= expert_sources(ours + "ffn.experts.", mlp, c.num_experts, c.expert_intermediate_size, fused_experts)
        if c.shared_expert_intermediate_size:
            names |= swiglu_sources(ours + "ffn.shared_expert.", theirs + "shared_expert.",
                                    c.shared_expert_intermediate_size)
    return names

