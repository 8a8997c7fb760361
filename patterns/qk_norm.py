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


# Pattern: qk_norm_rope = an rms_norm match (over head_dim of [B, T, H, D]) whose output is the x
# of a rope match. qk_norm alone records exactly like rms_norm and is fused by that pattern.
from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import Walker, no_overlap  # noqa: E402
from difuse.patterns.rms_norm import match_rms_norm_at, rms_norm_anchors  # noqa: E402
from difuse.patterns.rope import match_rope_at, rope_anchors  # noqa: E402


def qk_norm_rope_candidates(graph):
    """(walker, rms_norm match, rope match) for every per-head RMSNorm whose output a rope rotates;
    the walker holds both matches' nodes, unchecked for outside readers."""
    ropes = rope_anchors(graph)
    for anchor in rms_norm_anchors(graph):
        norm_walker = Walker(graph)
        norm = match_rms_norm_at(norm_walker, anchor)
        if not norm or len(norm_walker.shape(norm["x"])) != 4:
            continue
        for rope_anchor in ropes:
            walker = Walker(graph)
            walker.taken = list(norm_walker.taken)
            rope = match_rope_at(walker, rope_anchor)
            if rope and rope["x"] == norm["out"]:
                yield walker, norm, rope
                break


class QKNormRoPEPattern(Pattern):
    name = "qk_norm_rope"
    priority = 30  # before rms_norm and rope, which would take the halves

    def match(self, graph):
        matches = [walker.match(self.name, (norm["x"], norm["weight"], rope["cos"], rope["sin"]), (rope["out"],),
                                eps=norm["eps"])
                   for walker, norm, rope in qk_norm_rope_candidates(graph) if walker.closed([rope["out"]])]
        return no_overlap(matches)

    def reference(self, x, weight, cos, sin, eps):
        return qk_norm_rope(x, weight, eps, cos, sin)

    def kernel(self, x, weight, cos, sin, eps):
        return fused_qk_norm_rope(x, weight, eps, cos, sin)

    def bytes_moved(self, x, weight, cos, sin, eps=0.0):
        return qk_norm_rope_bytes(x, weight, eps, cos, sin)


register(QKNormRoPEPattern())
