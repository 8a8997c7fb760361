"""Per-head QK-norm: RMSNorm over head_dim of every head of q or k ([B, T, H, D], weight [D])."""
import torch

from difuse.patterns.rms_norm import rms_norm


def qk_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


# Fused kernels: qk_norm alone is the RMSNorm row kernel over head_dim rows (several heads per
# program); qk_norm_rope also applies RoPE in the same pass (rope.py's kernel with NORM on).
from difuse.patterns.rms_norm import _check_eps, launch_rms_norm  # noqa: E402
from difuse.patterns.rope import apply_rope, launch_norm_rope  # noqa: E402


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """Reference of the fused pair: apply_rope(qk_norm(x, weight, eps), cos, sin)."""
    return apply_rope(qk_norm(x, weight, eps), cos, sin)


def fused_qk_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton qk_norm: x [B, T, H, D] (any strides with unit stride in D), weight [D]."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    return launch_rms_norm(x, None, weight, eps)[0]


def fused_qk_norm_rope(x, weight, eps: float, cos, sin) -> torch.Tensor:
    """Triton qk_norm followed by apply_rope in one kernel."""
    return launch_norm_rope(x, weight, _check_eps(eps), cos, sin)


def qk_norm_bytes(x: torch.Tensor, weight: torch.Tensor, eps: float = 0.0) -> int:
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.numel() * (x.element_size() + out_dtype.itemsize) + weight.numel() * weight.element_size()


def qk_norm_rope_bytes(x, weight, eps, cos, sin) -> int:
    return qk_norm_bytes(x, weight) + 2 * cos.numel() * cos.element_size()
