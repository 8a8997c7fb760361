"""Building blocks shared by the model families: RMSNorm with a threaded residual, rotary
cos/sin tables, and attention over a (possibly cached) key/value sequence.

The math itself lives in difuse.patterns (rms_norm, add_rms_norm, apply_rope): calling those
reference functions keeps the recorded graphs in the forms the fusion matchers recognise.
"""
import torch
import torch.nn.functional as F
from torch import nn

from difuse.patterns.add_rms_norm import add_rms_norm
from difuse.patterns.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. With a residual, adds it first and also returns the sum, so the
    residual stream is threaded through the layers as (x + residual) -> norm in one fused step."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float):
    """positions: int64 [B, T] -> cos, sin: fp32 [B, T, rotary_dim] in rotate-half layout
    (the frequencies repeated twice), always computed in fp32 whatever the model dtype."""
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / rotary_dim))  # [R/2]
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
    return angles.cos(), angles.sin()


def attention(q, k, v, layer_index: int, cache, attention_bias):
    """q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (post-RoPE) -> [B, Hq, T, D].

    With a cache, `cache.update(layer_index, k, v)` stores this step's keys/values and returns
    the keys/values to attend over ([B, Hkv, S, D]) with an additive float bias of at least two
    dims broadcastable to [B, Hq, T, S], e.g. [B, 1, 1, S] for valid lengths (or None). Without one, the T tokens attend to each other under
    `attention_bias` (None: fully bidirectional)."""
    if cache is not None:
        if attention_bias is not None:
            raise ValueError("pass the attention bias through the cache when a cache is used")
        k, v, attention_bias = cache.update(layer_index, k, v)
    grouped = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_bias, is_causal=False, enable_gqa=grouped
    )
