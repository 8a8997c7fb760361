import pytest
import torch
import torch.nn.functional as F
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion.record import record
from difuse.patterns.swiglu import (
    SwiGLUPackedPattern,
    SwiGLUPattern,
    fused_swiglu,
    fused_swiglu_packed,
    swiglu,
    swiglu_bytes,
    swiglu_fused,
    swiglu_packed_bytes,
)

SHAPES = [(5, 123), (3, 1000), (2, 3, 5000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(device, dtype, shape):
    gate = torch.randn(shape, device=device, dtype=dtype)
    up = torch.randn(shape, device=device, dtype=dtype)
    assert_close(fused_swiglu(gate, up), swiglu(gate, up))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_packed_matches_reference(device, dtype, shape):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype)
    assert_close(fused_swiglu_packed(gate_up), swiglu_fused(gate_up))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_non_contiguous(device, dtype):
    gate = torch.randn(9, 4, 70, device=device, dtype=dtype).transpose(0, 1)
    up = torch.randn(4, 9, 140, device=device, dtype=dtype)[..., ::2]
    assert_close(fused_swiglu(gate, up), swiglu(gate, up))
    gate_up = torch.randn(6, 3, 2 * 70, device=device, dtype=dtype)[::2]
    assert_close(fused_swiglu_packed(gate_up), swiglu_fused(gate_up))


def test_swiglu_rejects_bad_input(device):
    with pytest.raises(ValueError, match="same shape"):
        fused_swiglu(torch.randn(3, 4, device=device), torch.randn(3, 5, device=device))
    with pytest.raises(ValueError, match="even last dim"):
        fused_swiglu_packed(torch.randn(3, 5, device=device))
    with pytest.raises(TypeError, match="up must be"):
        fused_swiglu(torch.randn(3, 4, device=device), torch.ones(3, 4, dtype=torch.int64, device=device))


def test_swiglu_bytes():
    g = torch.empty(4, 8, dtype=torch.bfloat16)
    assert swiglu_bytes(g, g) == 4 * 8 * 2 * 3
    assert swiglu_packed_bytes(torch.empty(4, 16, dtype=torch.bfloat16)) == 4 * 8 * 2 * 3


def _sigmoid_form(gate, up):
    return up * (gate * torch.sigmoid(gate))


def _functional_form(gate, up):
    return up * F.silu(gate)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [swiglu, _sigmoid_form, _functional_form])
def test_swiglu_matcher(device, dtype, fn):
    gate = torch.randn(4, 48, device=device, dtype=dtype)
    check_match_runs(SwiGLUPattern(), fn, (gate, torch.randn_like(gate)))


def _slice_halves(gate_up):
    gate, up = torch.chunk(gate_up, 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [swiglu_fused, _slice_halves])
def test_swiglu_packed_matcher(device, dtype, fn):
    check_match_runs(SwiGLUPackedPattern(), fn, (torch.randn(2, 3, 64, device=device, dtype=dtype),))


def test_swiglu_matcher_skips_broadcast_up():
    assert SwiGLUPattern().match(record(swiglu, torch.randn(4, 8), torch.randn(8))) == []
