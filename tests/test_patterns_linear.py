"""The weight-streaming linear kernel for few rows against torch.mm, its split-K bookkeeping and
its CUDA-graph replay."""
import time

import pytest
import torch
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion import FusionConfig, record
from difuse.fusion.heuristics import FusionHeuristics
from difuse.patterns import linear as linear_module
from difuse.patterns.linear import LinearPattern, fused_linear, linear, linear_bytes

# (M, N, K): one split, ragged N and K over several splits, one row, a block of 32 token rows
SHAPES = [(5, 123, 64), (3, 100, 1000), (1, 64, 2048), (32, 80, 384)]


def operands(shape, dtype, device):
    M, N, K = shape
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)  # outputs ~N(0, 1) at every K
    return x, w


def plan_of(x, w) -> dict:
    key = (linear_module.tensor_key(x), linear_module.tensor_key(w))
    return linear_module._PLANS.get(key, lambda: pytest.fail("fused_linear planned no launch for these operands"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(device, dtype, shape):
    x, w = operands(shape, dtype, device)
    assert_close(fused_linear(x, w), linear(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_non_contiguous(device, dtype):
    x = torch.randn(7, 2 * 300, device=device, dtype=dtype)[:, ::2]  # column stride 2: copied once
    w = (torch.randn(300, 90, device=device) / 300**0.5).to(dtype).t()  # a transposed weight
    assert_close(fused_linear(x, w), linear(x, w))
    rows = torch.randn(9, 300, device=device, dtype=dtype)[::3]  # row stride 900, read in place
    assert_close(fused_linear(rows, w), linear(rows, w))
    assert not plan_of(rows, w)["x_copy"]


@pytest.mark.gpu
def test_linear_splits_k_and_leaves_the_counts_zero(device):
    """The split sums do not depend on which split arrives last: repeated launches agree bit for
    bit, and each launch hands the next one zeroed arrival counts."""
    x, w = operands((4, 64, 4096), torch.float16, device)
    first = fused_linear(x, w)
    plan = plan_of(x, w)
    assert plan["constants"]["SPLIT_K"] > 1
    for _ in range(3):
        assert torch.equal(fused_linear(x, w), first)
    assert int(plan["workspace"][1].abs().sum()) == 0


def test_linear_rejects_bad_input(device):
    with pytest.raises(ValueError, match="at most"):
        fused_linear(torch.randn(linear_module.MAX_ROWS + 1, 8, device=device), torch.randn(4, 8, device=device))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        fused_linear(torch.randn(3, 8, device=device), torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match="one dtype"):
        fused_linear(torch.randn(3, 8, device=device), torch.randn(4, 8, device=device, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be"):
        fused_linear(torch.ones(3, 8, dtype=torch.int64, device=device), torch.randn(4, 8, device=device))


def test_linear_bytes():
    x, w = torch.empty(32, 4096, dtype=torch.bfloat16), torch.empty(1024, 4096, dtype=torch.bfloat16)
    assert linear_bytes(x, w) == 2 * (32 * 4096 + 1024 * 4096 + 32 * 1024)


@pytest.mark.cuda
def test_linear_replays_in_a_cuda_graph():
    x, w = operands((32, 4096, 4096), torch.bfloat16, "cuda")
    fused_linear(x, w)  # plans (and allocates the split workspace) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_linear(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_close(y, linear(x, w))


class Projection(torch.nn.Module):
    def __init__(self, inputs: int, outputs: int, dtype: torch.dtype, device: str):
        super().__init__()
        self.proj = torch.nn.Linear(inputs, outputs, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_pattern_replaces_a_streaming_projection(device, dtype, monkeypatch):
    monkeypatch.setattr(linear_module, "STREAMING_WEIGHT_BYTES", 0)  # tiny weights for the interpreter
    module = Projection(96, 160, dtype, device)
    with torch.inference_mode():
        check_match_runs(LinearPattern(), module, (torch.randn(2, 16, 96, device=device, dtype=dtype),),
                         expect_all_nodes=False)


def test_linear_pattern_leaves_what_cublas_does_better(monkeypatch):
    """More rows than STREAMING_ROWS, fp32, or a small weight: the matmul stays cuBLAS's."""
    with torch.inference_mode():
        small = record(Projection(96, 160, torch.bfloat16, "cpu"), torch.randn(2, 16, 96, dtype=torch.bfloat16))
        assert LinearPattern().match(small) == []
        monkeypatch.setattr(linear_module, "STREAMING_WEIGHT_BYTES", 0)
        assert len(LinearPattern().match(small)) == 1
        many_rows = torch.randn(linear_module.STREAMING_ROWS + 1, 96, dtype=torch.bfloat16)
        assert LinearPattern().match(record(Projection(96, 160, torch.bfloat16, "cpu"), many_rows)) == []
        assert LinearPattern().match(record(Projection(96, 160, torch.float32, "cpu"), torch.randn(4, 96))) == []


def test_profile_ratio_keeps_a_replacement_that_is_merely_faster(tmp_path):
    """fusion_ratio 0.8 asks a fusion to be 20% faster; a pattern's profile_ratio 0.98 raises the
    bar it must pass to 0.98 x the fallback, and a ratio above 1 keeps one up to that much slower."""
    fallback, fused = (lambda _: time.sleep(0.010)), (lambda _: time.sleep(0.009))  # fused 0.9 x fallback
    decide = FusionHeuristics(FusionConfig(cache_dir=tmp_path, profile=True)).profile_and_decide
    assert not decide("fusion", fused, fallback, lambda distinct=False: []).fuse
    kept = decide("replacement", fused, fallback, lambda distinct=False: [], min_ratio=0.98)
    assert kept.fuse and "0.98 x" in kept.reason
    slower = lambda _: time.sleep(0.011)  # noqa: E731 - 1.1 x the fallback, under a ratio of 1.2
    assert decide("early-launched", slower, fallback, lambda distinct=False: [], min_ratio=1.2).fuse


def test_linear_profile_ratio_is_read_when_deciding(monkeypatch):
    pattern = LinearPattern()
    assert pattern.profile_ratio == linear_module.PROFILE_RATIO
    monkeypatch.setattr(linear_module, "PROFILE_RATIO", 0.9)
    assert pattern.profile_ratio == 0.9


def test_linear_pattern_only_on_gpus_it_was_measured_on(monkeypatch):
    from difuse.patterns.linear import _measured_on

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not _measured_on("cuda:0")  # an A100 keeps cuBLAS
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _measured_on("cuda:0") and _measured_on("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not _measured_on("cuda:0")  # a Blackwell GPU: not measured
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not _measured_on("cuda:0")  # an MI300 under ROCm reports capability 9.4
