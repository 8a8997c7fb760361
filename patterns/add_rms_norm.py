"""Residual add followed by RMSNorm: returns (rms_norm(x + residual), x + residual)."""
import torch

from difuse.patterns.rms_norm import rms_norm


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    hidden = x + residual
    return rms_norm(hidden, weight, eps), hidden


# Fused kernel: the RMSNorm row kernel with the residual add folded in (one read of x and
# residual, one write each of the normed output and the new residual).
from difuse.patterns.rms_norm import launch_rms_norm  # noqa: E402


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton add+RMSNorm: returns (rms_norm(x + residual), x + residual) like the reference."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    return launch_rms_norm(x, residual, weight, eps)


def add_rms_norm_bytes(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 0.0) -> int:
    hidden_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(hidden_dtype, weight.dtype)
    reads = x.numel() * (x.element_size() + residual.element_size()) + weight.numel() * weight.element_size()
    return reads + x.numel() * (hidden_dtype.itemsize + out_dtype.itemsize)
