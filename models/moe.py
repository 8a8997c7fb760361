"""Mixture-of-experts pieces shared by LLaDA-MoE and LLaDA2: the two routers as plain torch
functions, and stacked SwiGLU experts with a plain PyTorch dispatch that serves as the reference
for fused MoE kernels.

Shapes: N tokens, H hidden, E experts, K experts per token, I expert inner size.
Router outputs: weights fp32 [N, K], expert ids int64 [N, K].
"""
import torch
import torch.nn.functional as F
from torch import nn

from difuse.patterns.swiglu import swiglu_fused


def softmax_topk_router(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None):
    """LLaDA-MoE (OLMoE-style): probabilities = softmax(logits) in fp32, plus the optional expert
    bias; the top-k of those values are both the choice and the weights (bias included, exactly
    as the HF code does), with no renormalisation."""
    scores = torch.softmax(logits.float(), dim=-1)  # [N, E]
    if expert_bias is not None:
        scores = scores + expert_bias.float()
    weights, ids = torch.topk(scores, top_k, dim=-1)
    return weights, ids


def sigmoid_group_topk_router(logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                              n_group: int, topk_group: int, routed_scaling_factor: float):
    """LLaDA2 (Bailing-MoE-v2): scores = sigmoid(logits) in fp32. Selection uses scores + bias:
    each group of E / n_group experts is rated by the sum of its two best biased scores, only the
    topk_group best groups stay eligible, then the top-k experts among them are chosen. Weights
    are the unbiased scores of the chosen experts, normalised to sum 1 (when K > 1) and scaled."""
    scores = torch.sigmoid(logits.float())  # [N, E]
    N, E = scores.shape
    biased = scores if expert_bias is None else scores + expert_bias.float()
    grouped = biased.view(N, n_group, E // n_group)  # [N, G, E/G]
    group_rating = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # [N, G]
    best_groups = group_rating.topk(topk_group, dim=-1).indices  # [N, topk_group]
    eligible = torch.zeros_like(group_rating, dtype=torch.bool).scatter_(1, best_groups, True)
    eligible = eligible[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
    ids = biased.masked_fill(~eligible, float("-inf")).topk(top_k, dim=-1).indices  # [N, K]
    weights = scores.gather(1, ids)
    if top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


class Experts(nn.Module):
    """E SwiGLU experts stacked: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].

    Two plain PyTorch dispatches compute the same sum; `dispatch` picks one:
    - "sorted" (default): token slots grouped by expert, one GEMM pair per expert that received
      tokens. Does only the needed work but reads the per-expert counts on the host, so it
      cannot be captured in a CUDA graph.
    - "dense": every expert runs on every token, weighted by its routing weight (0 when not
      chosen). No host sync and static shapes, so it is CUDA-graph capturable; it costs E / K
      times the expert FLOPs but reads the same weights, which at decode-sized token counts
      (where most experts are hit anyway) makes it about as fast.
    Fused MoE kernels replace both."""

    DISPATCHES = ("sorted", "dense")

    def __init__(self, num_experts: int, hidden: int, inner: int, dispatch: str = "sorted"):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights [N, K], ids [N, K] -> sum_k weights[n, k] * expert_ids[n, k](x[n]),
        accumulated in fp32 and returned in x's dtype."""
        if self.dispatch == "sorted":
            out = self._sorted(x, weights.float(), ids)
        elif self.dispatch == "dense":
            out = self._dense(x, weights.float(), ids)
        else:
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}; choose from {self.DISPATCHES}")
        return out.to(x.dtype)

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(swiglu_fused(F.linear(x, self.w13[expert])), self.w2[expert])

    def _sorted(self, x, weights, ids):
        N, K = ids.shape
        order = ids.flatten().argsort(stable=True)  # slot indices grouped by expert
        counts = torch.bincount(ids.flatten(), minlength=self.w13.shape[0]).tolist()  # host sync
        slot_weights = weights.flatten()
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start:start + count]
            tokens = slots // K
            out.index_add_(0, tokens, self._expert(expert, x[tokens]).float() * slot_weights[slots, None])
            start += count
        return out

    def _dense(self, x, weights, ids):
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for expert in range(self.w13.shape[0]):
            token_weight = (weights * (ids == expert)).sum(dim=-1)  # [N], 0 where not routed here
            out += self._expert(expert, x).float() * token_weight[:, None]
        return out


def set_moe_dispatch(model: nn.Module, dispatch: str) -> None:
    """Switch every Experts module of `model` to `dispatch` ("sorted" or "dense")."""
    if dispatch not in Experts.DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose from {Experts.DISPATCHES}")
    for module in model.modules():
        if isinstance(module, Experts):
            module.dispatch = dispatch
