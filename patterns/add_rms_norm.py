"""Residual add followed by RMSNorm: returns (rms_norm(x + residual), x + residual)."""
import torch

from difuse.patterns.rms_norm import rms_norm


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    hidden = x + residual
    return rms_norm(hidden, weight, eps), hidden
