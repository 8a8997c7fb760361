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


# Pattern: add_rms_norm = an rms_norm match whose input is a same-shape residual add (either
# operand order); outputs (normed, hidden), hidden being the new residual stream.
from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import Walker, no_overlap  # noqa: E402
from difuse.patterns.rms_norm import match_rms_norm_at, rms_norm_anchors  # noqa: E402


class AddRMSNormPattern(Pattern):
    name = "add_rms_norm"
    priority = 20  # before rms_norm, which would take the norm alone

    def match(self, graph):
        matches = []
        for anchor in rms_norm_anchors(graph):
            walker = Walker(graph)
            found = match_rms_norm_at(walker, anchor)
            if not found:
                continue
            hidden = found["x"]
            add = walker.take(hidden, "aten.add.Tensor")
            if add is None or len(add.inputs) != 2 or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
                continue
            a, b = add.inputs
            if walker.shape(a) != walker.shape(hidden) or walker.shape(b) != walker.shape(hidden):
                continue
            if walker.closed([found["out"], hidden]):
                matches.append(walker.match(self.name, (a, b, found["weight"]), (found["out"], hidden),
                                            eps=found["eps"]))
        return no_overlap(matches)

    def reference(self, x, residual, weight, eps):
        return add_rms_norm(x, residual, weight, eps)

    def kernel(self, x, residual, weight, eps):
        return fused_add_rms_norm(x, residual, weight, eps)

    def bytes_moved(self, x, residual, weight, eps=0.0):
        return add_rms_norm_bytes(x, residual, weight, eps)


register(AddRMSNormPattern())
