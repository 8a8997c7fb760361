"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (LLaDA/Llama order)."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
