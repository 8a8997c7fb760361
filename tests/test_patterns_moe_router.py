"""Fused softmax top-k router against softmax_topk_router, and its matcher on recorded graphs."""
import pytest
import torch

from difuse.fusion.record import record
from difuse.patterns.moe_router import (
    SoftmaxTopkRouterPattern, fused_softmax_topk_router, softmax_topk_router, softmax_topk_router_bytes,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, experts, top_k): LLaDA-MoE's 64 / 8 and LLaDA2's 256 / 8 expert counts, odd sizes.
SHAPES = [(5, 8, 3), (7, 64, 8), (3, 256, 8), (1, 6, 6)]


def check_router(logits, top_k, bias):
    """Weights (sorted scores) must match; our ids must point at exactly those scores (ties,
    possible once logits are rounded to 16 bits, may pick a different expert of equal score)."""
    weights, ids = fused_softmax_topk_router(logits, top_k, bias)
    expected_weights, _ = softmax_topk_router(logits, top_k, bias)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    scores = torch.softmax(logits.float(), -1) + (0 if bias is None else bias.float())
    torch.testing.assert_close(scores.gather(1, ids), weights, atol=1e-6, rtol=1e-5)
    assert all(len(set(row)) == top_k for row in ids.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_router_matches_reference(device, dtype, shape, with_bias):
    tokens, experts, top_k = shape
    logits = (torch.randn(tokens, experts) * 2).to(device, dtype)
    bias = (torch.randn(experts) * 0.05).to(device) if with_bias else None
    check_router(logits, top_k, bias)


@pytest.mark.gpu
def test_fused_router_non_contiguous_and_exact_ids(device):
    logits = torch.randn(9, 40, device=device)[:, 3:35]  # row stride 40
    weights, ids = fused_softmax_topk_router(logits, 4)
    expected_weights, expected_ids = softmax_topk_router(logits, 4)
    assert torch.equal(ids, expected_ids)  # fp32 random logits: no ties
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_fused_router_rejects_bad_input():
    with pytest.raises(ValueError, match=r"top_k 9 not in \[1, 8\]"):
        fused_softmax_topk_router(torch.randn(3, 8), 9)
    with pytest.raises(ValueError, match=r"expert_bias must be \[8\]"):
        fused_softmax_topk_router(torch.randn(3, 8), 2, torch.zeros(4))
    with pytest.raises(ValueError, match=r"float \[N, E\]"):
        fused_softmax_topk_router(torch.randn(2, 3, 8), 2)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_matcher_covers_the_recorded_router(logits_dtype, bias_dtype):
    logits = torch.randn(6, 16).to(logits_dtype)
    if bias_dtype is None:
        graph = record(lambda x: softmax_topk_router(x, 4), logits)
    else:
        graph = record(lambda x, b: softmax_topk_router(x, 4, b), logits, (torch.randn(16) * 0.05).to(bias_dtype))
    pattern = SoftmaxTopkRouterPattern()
    (match,) = pattern.match(graph)
    assert match.nodes == tuple(range(len(graph.nodes)))  # the cast(s), softmax, add and topk
    assert match.inputs == tuple(graph.inputs) and match.outputs == tuple(graph.outputs)
    assert match.params == {"top_k": 4}


def test_matcher_refuses_other_forms():
    pattern = SoftmaxTopkRouterPattern()
    x = torch.randn(6, 16)
    assert pattern.match(record(lambda t: torch.topk(t.sigmoid(), 2), x)) == []  # not a softmax
    assert pattern.match(record(lambda t: torch.topk(torch.softmax(t, 0), 2), x)) == []  # wrong axis

    def probs_escape(t):
        probs = torch.softmax(t, -1)
        return torch.topk(probs, 2), probs.sum()

    assert pattern.match(record(probs_escape, x)) == []  # the probabilities are used elsewhere


def test_router_bytes():
    logits = torch.empty(4, 64, dtype=torch.bfloat16)
    assert softmax_topk_router_bytes(logits, 8, torch.empty(64)) == 4 * 64 * 2 + 64 * 4 + 4 * 8 * 12


def test_matcher_covers_the_inference_mode_form():
    """Under inference_mode the recorder decomposes composite ops, so the router records as under no_grad."""
    with torch.inference_mode():
        graph = record(lambda x, b: softmax_topk_router(x, 2, b), torch.randn(4, 8).bfloat16(), torch.randn(8))
    ops = {node.op for node in graph.nodes}
    assert "aten._softmax.default" in ops and "aten.softmax.int" not in ops
    (match,) = SoftmaxTopkRouterPattern().match(graph)
    assert match.nodes == tuple(range(len(graph.nodes)))
