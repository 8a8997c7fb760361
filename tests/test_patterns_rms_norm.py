import pytest
import torch
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion.record import record
from difuse.patterns.rms_norm import RMSNormPattern, fused_rms_norm, rms_norm, rms_norm_bytes

SHAPES = [(5, 123), (3, 1000), (2, 3, 64), (2, 9000)]  # 9000 > 8192: the chunked two-pass path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(device, dtype, shape, norm_weight_first):
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.randn(shape[-1], device=device, dtype=dtype)
    assert_close(fused_rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_and_mixed_weight(device, dtype):
    base = torch.randn(4, 10, 96, device=device, dtype=dtype)
    x = base[:, ::3, :80]  # strided rows and a column slice
    weight = torch.randn(80, device=device, dtype=torch.float32)
    assert_close(fused_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), rounding=dtype)
    xt = torch.randn(64, 6, device=device, dtype=dtype).t()  # unit stride not in the last dim
    assert_close(fused_rms_norm(xt, weight[:64].to(dtype), 0.1), rms_norm(xt, weight[:64].to(dtype), 0.1))


@pytest.mark.gpu
def test_rms_norm_eps_is_a_runtime_argument(device):
    x = torch.randn(3, 64, device=device) * 1e-3
    weight = torch.ones(64, device=device)
    for eps in (1e-6, 1e-2, 1.0):
        assert_close(fused_rms_norm(x, weight, eps), rms_norm(x, weight, eps))


def test_rms_norm_rejects_bad_input(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        fused_rms_norm(x, torch.ones(7, device=device), 1e-6)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fused_rms_norm(x.to(torch.int32), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="one device"):
        fused_rms_norm(x, torch.ones(8, device="meta"), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        fused_rms_norm(x, torch.ones(8, device=device), -1.0)


@pytest.mark.gpu
def test_cached_launch_plans_serve_new_tensors_of_the_same_layout(device):
    """The second call of each layout takes its plan from the cache: a view that needs a copy
    (three strided row dims) and one that does not, with new data each time."""
    for _ in range(2):
        scattered = torch.randn(3, 4, 5, 6, 40, device=device)[:, ::2, :, ::2, :]  # no 2-dim row view
        sliced = torch.randn(5, 48, device=device)[:, 4:44]
        w = torch.randn(40, device=device)
        assert_close(fused_rms_norm(scattered, w, 1e-6), rms_norm(scattered, w, 1e-6))
        assert_close(fused_rms_norm(sliced, w, 1e-6), rms_norm(sliced, w, 1e-6))
    with pytest.raises(ValueError, match="weight must be"):
        fused_rms_norm(sliced, torch.randn(41, device=device), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        fused_rms_norm(sliced, w, -1.0)


def test_rms_norm_bytes():
    x, w = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(8, dtype=torch.bfloat16)
    assert rms_norm_bytes(x, w) == 4 * 8 * 2 * 2 + 8 * 2


def _weight_first(x, weight, eps):
    x32 = x.float()
    return weight * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _weight_last(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [rms_norm, _weight_first, _weight_last])
def test_rms_norm_matcher(device, dtype, fn):
    x = torch.randn(5, 48, device=device, dtype=dtype)
    weight = torch.randn(48, device=device, dtype=dtype)
    match = check_match_runs(RMSNormPattern(), fn, (x, weight, 1e-6))
    assert match.params["eps"].index == 2  # eps stays a runtime argument


def test_rms_norm_matcher_skips_leaking_intermediates():
    def leaks(x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (x32 * rstd).to(x.dtype), rstd

    graph = record(leaks, torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16), 1e-6)
    assert RMSNormPattern().match(graph) == []


def test_rms_norm_matcher_needs_a_last_dim_mean():
    def over_rows(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps))

    assert RMSNormPattern().match(record(over_rows, torch.randn(16, 16), torch.randn(16), 1e-6)) == []
