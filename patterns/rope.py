"""Rotary position embedding, rotate-half (NeoX/HF) layout, with partial rotary.

x: [B, T, H, D]; cos, sin: [B or 1, T, R] in fp32 with R <= D even. The first R features of every
head are rotated, the remaining D - R pass through. Computed in fp32, returned in x's dtype.
"""
import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    x32 = x.float()
    x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R]: broadcast over heads
    out = torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
    return out.to(x.dtype)
