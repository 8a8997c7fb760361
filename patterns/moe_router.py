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


# ---------------------------------------------------------------------------------------------
# Fused softmax top-k router: one program per token row holds its E scores in registers:
# fp32 softmax, optional bias, then K rounds of (argmax, take, knock out). The eager form is 3-5
# launches (cast, softmax, add, topk) over an [N, E] tensor; at decode sizes launches dominate.

import difuse.fusion  # noqa: E402,F401  (selects the Triton interpreter on CPU-only hosts before triton loads)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from difuse.fusion.ir import Ref  # noqa: E402
from difuse.fusion.pattern import Pattern, register  # noqa: E402


@triton.jit
def _softmax_topk_kernel(
    logits_ptr, stride_row,  # [N, E], unit stride along E
    bias_ptr,  # fp32 [E] (unused without HAS_BIAS)
    weights_ptr, ids_ptr,  # contiguous [N, K]: fp32, int64
    E, K,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    inside = cols < E
    x = tl.load(logits_ptr + row * stride_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    scores = p / tl.sum(p, axis=0)
    if HAS_BIAS:
        scores += tl.load(bias_ptr + cols, mask=inside, other=0.0)
    scores = tl.where(inside, scores, float("-inf"))
    for k in range(K):
        best = tl.argmax(scores, axis=0)
        tl.store(weights_ptr + row * K + k, tl.max(scores, axis=0))
        tl.store(ids_ptr + row * K + k, best.to(tl.int64))
        scores = tl.where(cols == best, float("-inf"), scores)


def fused_softmax_topk_router(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None):
    """Triton softmax_topk_router: logits [N, E] -> (weights fp32 [N, K], ids int64 [N, K]),
    best first (ties, which random scores never produce, may order differently from torch.topk)."""
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [N, E] tensor, got {logits.dtype} {tuple(logits.shape)}")
    N, E = logits.shape
    if not 0 < top_k <= E:
        raise ValueError(f"top_k {top_k} not in [1, {E}]")
    if expert_bias is not None and expert_bias.shape != (E,):
        raise ValueError(f"expert_bias must be [{E}], got {tuple(expert_bias.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    if N == 0:
        return weights, ids
    bias = expert_bias.float().contiguous() if expert_bias is not None else weights
    block = triton.next_power_of_2(E)
    _softmax_topk_kernel[(N,)](logits, logits.stride(0), bias, weights, ids, E, top_k,
                               HAS_BIAS=expert_bias is not None, BLOCK_E=block, num_warps=1 if block <= 256 else 4)
    return weights, ids


def softmax_topk_router_bytes(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None) -> int:
    bias = expert_bias.numel() * expert_bias.element_size() if expert_bias is not None else 0
    return logits.numel() * logits.element_size() + bias + logits.shape[0] * top_k * (4 + 8)


class SoftmaxTopkRouterPattern(Pattern):
    """[cast to fp32] -> _softmax(last dim) -> [+ bias [E] (maybe cast)] -> topk(K) on [N, E]:
    the recorded form of softmax_topk_router."""

    name = "softmax_topk_router"
    priority = 20

    def match(self, graph):
        matches = []
        for index, node in enumerate(graph.nodes):
            if node.op == "aten.topk.default":
                found = self._match_at(graph, index, node)
                if found is not None:
                    matches.append(found)
        return matches

    def _match_at(self, graph, index, topk):
        if len(topk.args) < 2 or not isinstance(topk.args[1], int) or any(
                a not in (-1, True) for a in topk.args[2:5]) or topk.kwargs:
            return None  # only topk(x, K) along the last dim, largest first, sorted
        taken, bias = [index], None
        scores = topk.inputs[0]
        if len(graph.meta[scores].shape) != 2:
            return None
        producer = graph.producer_node(scores)
        if producer is not None and producer.op == "aten.add.Tensor" and len(producer.inputs) == 2:
            probs, other = producer.inputs
            if graph.meta[other].shape != graph.meta[scores].shape[-1:] and graph.meta[probs].shape[-1:] == (
                    graph.meta[scores].shape[-1],):
                probs, other = other, probs
            if graph.meta[other].shape != (graph.meta[scores].shape[-1],) or producer.kwargs:
                return None
            taken.append(graph.producer(scores))
            bias = self._uncast(graph, other, taken)
            scores = probs
        softmax = graph.producer_node(scores)
        if softmax is None or softmax.op not in self.SOFTMAX or softmax.args[1] not in (-1, 1) or any(
                softmax.args[2:]) or softmax.kwargs.get("dtype") is not None:
            return None
        if graph.meta[scores].dtype != torch.float32:
            return None
        taken.append(graph.producer(scores))
        logits = self._uncast(graph, softmax.inputs[0], taken)
        values, ids = topk.outputs
        if not self._closed(graph, taken, {values, ids}):
            return None
        from difuse.fusion.pattern import Match

        inputs = (logits,) if bias is None else (logits, bias)
        return Match(self.name, tuple(sorted(taken)), inputs, (values, ids), {"top_k": topk.args[1]})

    # Recorded under autograd the composite ops decompose; under inference_mode they stay whole.
    SOFTMAX = ("aten._softmax.default", "aten.softmax.int")

    @staticmethod
    def _uncast(graph, value, taken):
        """Step back over a cast to fp32 (`.float()`: _to_copy, or to.dtype under inference_mode)."""
        node = graph.producer_node(value)
        if node is None or not isinstance(node.args[0], Ref):
            return value
        to_copy = node.op == "aten._to_copy.default" and len(node.args) == 1 and node.kwargs == {"dtype": torch.float32}
        to_dtype = node.op == "aten.to.dtype" and node.args[1:] in ((torch.float32,), (torch.float32, False, False)) \
            and not node.kwargs
        if to_copy or to_dtype:
            taken.append(graph.producer(value))
            return node.inputs[0]
        return value

    @staticmethod
    def _closed(graph, taken, outputs):
        inside = set(taken)
        for i in inside:
            for value in graph.nodes[i].outputs:
                if value not in outputs and (value in graph.outputs or any(u not in inside for u in graph.users(value))):
                    return False
        return True

    def reference(self, logits, expert_bias=None, top_k=1):
        return softmax_topk_router(logits, top_k, expert_bias)

    def kernel(self, logits, expert_bias=None, top_k=1):
        return fused_softmax_topk_router(logits, top_k, expert_bias)

    def bytes_moved(self, logits, expert_bias=None, top_k=1):
        return softmax_topk_router_bytes(logits, top_k, expert_bias)


register(SoftmaxTopkRouterPattern())
