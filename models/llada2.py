"""LLaDA2 (inclusionAI/LLaDA2.0-mini / -flash, 2.1): the Bailing-MoE-v2 (Ling 2.0) decoder trained
for block diffusion.

    h   = x + dense(SDPA(rope(q_norm(q)), rope(k_norm(k)), v, block-causal bias))   GQA, fused QKV
    out = h + scale * sum_top-k w_e * expert_e(n) + shared_experts(n)             n = norm(h)

The first `first_k_dense_replace` layers use a dense SwiGLU MLP. The router is a sigmoid with an
expert bias used only to choose experts, group-limited top-k, renormalised weights times
routed_scaling_factor. RoPE is rotate-half on the first partial_rotary_factor * head_dim dims.
Attention is block-causal: bidirectional inside a block of `block_length` tokens, and every
block sees all earlier blocks (`block_causal_bias`).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from difuse.models.hf_config import check_head_counts, check_special_tokens, config_from_hf, rotary_dim_of
from difuse.models.layers import Attention, DecoderLayer, DecoderModel, SwiGLUMLP
from difuse.models.moe import Experts, sigmoid_group_topk_router
from difuse.models.packing import Source, expert_sources, swiglu_sources

DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


def block_causal_bias(total_len: int, block_length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive attention bias [1, 1, L, L]: 0 where query i may see key j (block(j) <= block(i)),
    -inf elsewhere; blocks of `block_length` tokens counted from position 0."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    block = torch.arange(total_len, device=device) // block_length
    visible = block[None, :] <= block[:, None]  # [L, L]: key block <= query block
    bias = torch.zeros(total_len, total_len, device=device, dtype=dtype).masked_fill(~visible, float("-inf"))
    return bias[None, None]


@dataclass(slots=True)
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    num_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_function: str = "sigmoid"
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 16384
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    eos_token_id: int = DEFAULT_EOS_TOKEN_ID
    pad_token_id: int | None = None
    rotary_dim: int = field(init=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_head_counts(self.num_attention_heads, self.num_key_value_heads)
        self.rotary_dim = rotary_dim_of(self.head_dim, self.partial_rotary_factor)
        if self.first_k_dense_replace > 0 and self.intermediate_size is None:
            raise ValueError("first_k_dense_replace > 0 needs intermediate_size for the dense layers")
        if self.score_function != "sigmoid":
            raise ValueError(f"unsupported score_function {self.score_function!r} (only 'sigmoid')")
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"num_experts {self.num_experts} must split into n_group {self.n_group} groups "
                             f"and topk_group {self.topk_group} must be in [1, n_group]")
        eligible = self.topk_group * self.num_experts // self.n_group
        if not 0 < self.num_experts_per_tok <= eligible:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in [1, {eligible}] "
                             f"(experts in the topk_group best groups)")
        check_special_tokens(self, self.vocab_size)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LLaDA2Config":
        # norm_topk_prob and router_dtype appear in config.json; the reference code always
        # renormalises (for top-k > 1) and always routes in fp32, as we do.
        fixed = {"use_qkv_bias": False, "use_bias": False, "norm_head": False, "tie_word_embeddings": False,
                 "hidden_act": "silu", "rope_scaling": None}
        return config_from_hf(cls, hf, "LLaDA2", fixed)


class SparseMoE(nn.Module):
    def __init__(self, c: LLaDA2Config):
        super().__init__()
        self.config = c
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        # The reference gate always holds (and saves) an expert bias, whatever
        # moe_router_enable_expert_bias says, so the checkpoint always carries one.
        self.expert_bias = nn.Parameter(torch.zeros(c.num_experts))
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (SwiGLUMLP(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts)
                               if c.num_shared_experts else None)

    def forward(self, x):
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        logits = F.linear(flat.float(), self.gate.weight.float())  # router in fp32
        weights, ids = sigmoid_group_topk_router(logits, self.expert_bias, self.config.num_experts_per_tok,
                                                 self.config.n_group, self.config.topk_group, self.config.routed_scaling_factor)
        out = self.experts(flat, weights, ids)  # [N, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, H)


class LLaDA2Model(DecoderModel):
    # router_dtype fp32: the gate GEMM and the expert bias stay in fp32 whatever the model dtype.
    FP32_PARAMETERS = ("ffn.gate.weight", "expert_bias")
    BLOCK_CAUSAL = True

    def __init__(self, config: LLaDA2Config):
        c = config
        qk_eps = c.rms_norm_eps if c.use_qk_norm else None
        layers = [
            DecoderLayer(
                c.hidden_size, c.rms_norm_eps,
                Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                          layer_index=i, qk_norm_eps=qk_eps),
                SwiGLUMLP(c.hidden_size, c.intermediate_size) if i < c.first_k_dense_replace else SparseMoE(c),
            )
            for i in range(c.num_hidden_layers)
        ]
        super().__init__(c, c.vocab_size, c.hidden_size, c.rms_norm_eps, c.rotary_dim, c.rope_theta, layers)


def checkpoint_map(config: LLaDA2Config, checkpoint_keys: set[str]) -> dict[str, Source]:
    """The HF fused `query_key_value` rows are already [q heads | k heads | v heads], our layout."""
    c = config
    fused_experts = any(key.endswith(".mlp.w1") for key in checkpoint_keys)
    names = {"embed_tokens.weight": "model.word_embeddings.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(c.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "attention.", theirs + "mlp."
        names |= {
            ours + "attn_norm.weight": theirs + "input_layernorm.weight",
            ours + "attn.qkv.weight": attn + "query_key_value.weight",
            ours + "attn.out.weight": attn + "dense.weight",
            ours + "ffn_norm.weight": theirs + "post_attention_layernorm.weight",
        }
        if c.use_qk_norm:
            names[ours + "attn.q_norm.weight"] = attn + "query_layernorm.weight"
            names[ours + "attn.k_norm.weight"] = attn + "key_layernorm.weight"
        if i < c.first_k_dense_replace:
            names |= swiglu_sources(ours + "ffn.", mlp, c.intermediate_size)
            continue
        names[ours + "ffn.gate.weight"] = mlp + "gate.weight"
        names[ours + "ffn.expert_bias"] = mlp + "gate.expert_bias"
        names |= expert_sources(ours + "ffn.experts.", mlp, c.num_experts, c.moe_intermediate_size, fused_experts)
        if c.num_shared_experts:
            names |= swiglu_sources(ours + "ffn.shared_experts.", mlp + "shared_experts.",
                                    c.moe_intermediate_size * c.num_shared_experts)
    return names
