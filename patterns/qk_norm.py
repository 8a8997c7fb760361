"""Per-head QK-norm: RMSNorm over head_dim of every head of q or k ([B, T, H, D], weight [D])."""
import torch

from difuse.patterns.rms_norm import rms_norm


def qk_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)
