"""Mixture-of-experts routers as plain torch functions, so the recorder sees every op of them.

Shapes: N tokens, E experts, K experts per token. Outputs: weights fp32 [N, K], expert ids
int64 [N, K]. Both routers work in fp32 whatever the logits dtype, as the reference models do.
"""
import torch


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
