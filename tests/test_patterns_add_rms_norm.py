import pytest
import torch
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion.record import record
from difuse.patterns.add_rms_norm import AddRMSNormPattern, add_rms_norm, add_rms_norm_bytes, fused_add_rms_norm


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (3, 1000), (2, 3, 64), (2, 9000)])
def test_add_rms_norm_matches_reference(device, dtype, shape, norm_weight_first):
    x = torch.randn(shape, device=device, dtype=dtype)
    residual = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.randn(shape[-1], device=device, dtype=dtype)
    normed, hidden = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_hidden = add_rms_norm(x, residual, weight, 1e-6)
    assert_close(hidden, ref_hidden)
    assert_close(normed, ref_normed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_non_contiguous(device, dtype):
    x = torch.randn(7, 2, 100, device=device, dtype=dtype)[:, 1, :]
    residual = torch.randn(100, 7, device=device, dtype=dtype).t()
    weight = torch.randn(100, device=device, dtype=dtype)
    for got, want in zip(fused_add_rms_norm(x, residual, weight, 1e-5), add_rms_norm(x, residual, weight, 1e-5)):
        assert_close(got, want)


def test_add_rms_norm_rejects_bad_input(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="residual shape"):
        fused_add_rms_norm(x, torch.randn(4, 7, device=device), torch.ones(8, device=device), 1e-6)
    with pytest.raises(TypeError, match="residual"):
        fused_add_rms_norm(x, None, torch.ones(8, device=device), 1e-6)


def test_add_rms_norm_bytes():
    x = torch.empty(4, 8, dtype=torch.bfloat16)
    assert add_rms_norm_bytes(x, x, torch.empty(8, dtype=torch.bfloat16)) == 4 * 8 * 2 * 4 + 8 * 2


def _residual_first(x, residual, weight, eps):
    hidden = residual + x
    h32 = hidden.float()
    return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype) * weight, hidden


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [add_rms_norm, _residual_first])
def test_add_rms_norm_matcher(device, dtype, fn):
    x = torch.randn(5, 40, device=device, dtype=dtype)
    residual = torch.randn(5, 40, device=device, dtype=dtype)
    weight = torch.randn(40, device=device, dtype=dtype)
    match = check_match_runs(AddRMSNormPattern(), fn, (x, residual, weight, 1e-6))
    assert len(match.outputs) == 2  # normed and the new residual


def test_add_rms_norm_matcher_skips_broadcast_add():
    x, bias, weight = torch.randn(5, 16), torch.randn(16), torch.randn(16)
    assert AddRMSNormPattern().match(record(add_rms_norm, x, bias, weight, 1e-6)) == []
