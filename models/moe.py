"""Mixture-of-experts pieces shared by LLaDA-MoE and LLaDA2: the two routers (plain torch
functions in difuse.patterns.moe_router) and stacked SwiGLU experts with a choice of dispatch.

Shapes: N tokens, H hidden, E experts, K experts per token, I expert inner size.
Router outputs: weights fp32 [N, K], expert ids int64 [N, K].
"""
import torch
from torch import nn

from difuse.patterns.moe import fused_moe, moe_dense_reference, moe_sorted_reference
from difuse.patterns.moe_router import sigmoid_group_topk_router, softmax_topk_router

__all__ = ["DISPATCHES", "Experts", "set_moe_dispatch", "sigmoid_group_topk_router", "softmax_topk_router"]

# "auto": the fused Triton kernels on CUDA, the dense reference elsewhere (the Triton interpreter is
# far too slow for whole models on CPU). The others force one implementation (difuse.patterns.moe).
# "dense" and "fused" are sync-free: a recorded or CUDA-graph-captured step replays them correctly
# for any routing. "sorted" reads per-expert counts on the host, so a recorded step would replay
# the routing it was recorded with: use it only for eager runs.
DISPATCHES = {"sorted": moe_sorted_reference, "dense": moe_dense_reference, "fused": fused_moe}


class Experts(nn.Module):
    """E SwiGLU experts stacked: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].

    Under expert parallelism a rank holds the experts [first_expert, first_expert + E) and its
    output sums only their contributions; the ranks' outputs are summed by an all-reduce."""

    def __init__(self, num_experts: int, hidden: int, inner: int, dispatch: str = "auto"):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.dispatch = dispatch
        self.first_expert = 0

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights [N, K], ids [N, K] (global expert ids) -> [N, H] in x's dtype:
        sum_k weights[n, k] * expert_ids[n, k](x[n]) over the experts held here, accumulated in fp32."""
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "fused" if x.is_cuda else "dense"
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}; choose from {('auto', *DISPATCHES)}")
        if self.first_expert:
            ids = ids - self.first_expert  # ids outside [0, E) then contribute nothing
        return DISPATCHES[dispatch](x, self.w13, self.w2, weights, ids)


def set_moe_dispatch(model: nn.Module, dispatch: str) -> None:
    """Switch every Experts module of `model` to `dispatch`: "auto" (default: fused on CUDA,
    dense elsewhere), "fused", "sorted" or "dense"."""
    if dispatch != "auto" and dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose from {('auto', *DISPATCHES)}")
    for module in model.modules():
        if isinstance(module, Experts):
            module.dispatch = dispatch
