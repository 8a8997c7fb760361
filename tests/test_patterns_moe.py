"""Fused MoE (Triton grouped GEMMs over expert-sorted slots) against the plain PyTorch dispatches,
the sync-free alignment, expert-parallel ids, input checks, the bytes model, and the routers'
graph-recordable form."""
import pytest
import torch

from difuse.patterns import moe
from difuse.patterns.moe import (
    align_by_expert, align_by_expert_reference, fused_moe, moe_bytes, moe_dense_reference, moe_sorted_reference,
    padded_capacity,
)
from difuse.patterns.moe_router import softmax_topk_router

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# GEMM accumulation order differs from ATen's, so a rounded intermediate (gate-up output,
# activation, expert output) can land one ulp apart and carry through the down projection.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
              torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
# (tokens, experts, top_k, hidden, inner): odd token counts, hidden and inner not powers of two,
# experts left without tokens, more experts than slots.
SHAPES = [(7, 4, 2, 32, 16), (5, 6, 3, 40, 24), (1, 8, 2, 32, 16), (19, 3, 1, 24, 40)]


def make_inputs(tokens, experts, top_k, hidden, inner, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    w13 = (torch.randn(experts, 2 * inner, hidden, generator=generator) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inner, generator=generator) / inner**0.5).to(device, dtype)
    weights, ids = softmax_topk_router(torch.randn(tokens, experts, generator=generator).to(device), top_k)
    return x, w13, w2, weights, ids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_matches_reference(device, dtype, shape):
    x, w13, w2, weights, ids = make_inputs(*shape, dtype, device)
    out = fused_moe(x, w13, w2, weights, ids)
    expected = moe_sorted_reference(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(moe_dense_reference(x, w13, w2, weights, ids), expected, **TOLERANCES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_non_contiguous_and_large_blocks(device, dtype):
    x, w13, w2, weights, ids = make_inputs(9, 5, 2, 48, 32, dtype, device, seed=1)
    x_t = x.t().contiguous().t()  # column-major [N, H]
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] with H-major storage
    expected = moe_sorted_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe(x_t, w13_t, w2, weights.to(torch.float16), ids.int(), block_m=64),
                               moe_sorted_reference(x, w13, w2, weights.to(torch.float16), ids), **TOLERANCES[dtype])
    torch.testing.assert_close(fused_moe(x_t, w13_t, w2, weights, ids, block_m=32), expected, **TOLERANCES[dtype])


@pytest.mark.gpu
def test_fused_moe_expert_shards_sum_to_the_whole(device):
    """Expert parallelism: each shard gets global ids minus its first expert; ids outside the
    shard contribute nothing, so the shards' outputs add up to the unsharded result."""
    x, w13, w2, weights, ids = make_inputs(11, 6, 3, 32, 16, torch.float32, device, seed=2)
    whole = moe_sorted_reference(x, w13, w2, weights, ids)
    parts = [fused_moe(x, w13[first:first + 3], w2[first:first + 3], weights, ids - first) for first in (0, 3)]
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-5, rtol=1e-5)
    for first, part in zip((0, 3), parts):
        shard = (w13[first:first + 3], w2[first:first + 3])
        torch.testing.assert_close(part, moe_sorted_reference(x, *shard, weights, ids - first), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part, moe_dense_reference(x, *shard, weights, ids - first), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_align_by_expert_groups_and_pads(device):
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 7], [-1, 2]], device=device)  # 7 and -1: not on this shard
    block_m = 4
    slots, block_expert = align_by_expert(ids, num_experts=3, block_m=block_m)
    S = ids.numel()
    assert slots.shape == (padded_capacity(S, 3, block_m),) and block_expert.shape == (slots.numel() // block_m,)
    flat = ids.flatten()
    seen = []
    for b, expert in enumerate(block_expert.tolist()):
        block = slots[b * block_m:(b + 1) * block_m].tolist()
        real = [s for s in block if s < S]
        if expert < 0:
            assert not real
            continue
        assert real and all(flat[s] == expert for s in real)
        assert block[:len(real)] == sorted(real)  # stable: slots in token order, padding after
        seen += real
    assert sorted(seen) == [s for s in range(S) if 0 <= flat[s] < 3]
    assert block_expert.tolist() == [0, 1, 2, 2, -1]  # expert 2 has 5 slots: two blocks; 10 + 3 * 3 rows -> 5 blocks


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k, experts, block_m", [
    (32, 8, 64, 16),  # a decode block of LLaDA-MoE: 256 slots
    (300, 3, 7, 16),  # 900 slots over 7 experts, not a power of two
    (6, 2, 40, 64),  # more experts than slots: most get none
    (1, 2, 5, 16),
])
@pytest.mark.parametrize("chunk", [64, moe.ALIGN_CHUNK])
def test_align_kernel_matches_stable_sort(device, monkeypatch, tokens, top_k, experts, block_m, chunk):
    """The counting sort gives exactly the rows of a stable argsort by expert, foreign ids
    (another shard's, or negative) placed nowhere; a small chunk takes several loop steps."""
    monkeypatch.setattr(moe, "ALIGN_CHUNK", chunk)
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(-2, experts + 3, (tokens, top_k), generator=generator).to(device)
    for id_dtype in (torch.int64, torch.int32):
        slots, block_expert = align_by_expert(ids.to(id_dtype), experts, block_m)
        expected_slots, expected_blocks = align_by_expert_reference(ids, experts, block_m)
        assert torch.equal(slots.cpu(), expected_slots.cpu())
        assert torch.equal(block_expert.cpu(), expected_blocks.cpu())


def test_fused_moe_rejects_bad_input():
    x, w13, w2, weights, ids = make_inputs(4, 3, 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13[:, :, :8], w2, weights, ids)
    with pytest.raises(ValueError, match=r"must both be \[N=4, K\]"):
        fused_moe(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_moe(x, w13.half(), w2, weights, ids)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(TypeError, match="x must be"):
        fused_moe(x.double(), w13, w2, weights, ids)


def test_moe_bytes_counts_routed_experts_only():
    x, w13, w2, weights, ids = make_inputs(3, 8, 2, 16, 16, torch.bfloat16, "cpu")
    ids = torch.tensor([[0, 5], [5, 0], [0, 9]])  # two distinct experts here (9 is another shard's)
    per_expert = (2 * 16 * 16 + 16 * 16) * 2
    assert moe_bytes(x, w13, w2, weights, ids) == 2 * per_expert + 2 * 3 * 16 * 2 + 6 * 4 + 6 * 8


@pytest.mark.cuda
def test_fused_moe_captures_in_cuda_graph():
    x, w13, w2, weights, ids = make_inputs(32, 16, 4, 256, 128, torch.bfloat16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the graph
        fused_moe(x, w13, w2, weights, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, w13, w2, weights, ids)
    new_weights, new_ids = softmax_topk_router(torch.randn(32, 16, device="cuda"), 4)
    weights.copy_(new_weights)
    ids.copy_(new_ids)  # a different routing replays through the same static shapes
    graph.replay()
    torch.testing.assert_close(captured, moe_sorted_reference(x, w13, w2, weights, ids), **TOLERANCES[torch.bfloat16])


def test_fused_moe_is_one_recorded_op():
    """The step recorder sees difuse::fused_moe as one op (kernel launches are invisible to it)
    and replays it; under FakeTensorMode it only needs shapes."""
    from difuse.fusion.record import record

    x, w13, w2, weights, ids = make_inputs(5, 4, 2, 32, 16, torch.float32, "cpu")
    graph = record(fused_moe, x, w13, w2, weights, ids)
    assert [node.op for node in graph.nodes] == ["difuse.fused_moe.default"]
