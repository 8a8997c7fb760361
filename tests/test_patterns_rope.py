import pytest
import torch
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.patterns.rope import RoPEPattern, apply_rope, fused_apply_rope, rope_bytes

# (B, T, H, D, R, batch of cos/sin)
SHAPES = [(2, 5, 3, 64, 64, 2), (1, 7, 5, 48, 32, 1), (2, 3, 4, 24, 8, 1)]


def tables(batch, T, R, device):
    angles = torch.randn(batch, T, R // 2, device=device)
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(device, dtype, shape):
    B, T, H, D, R, batch = shape
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    cos, sin = tables(batch, T, R, device)
    assert_close(fused_apply_rope(x, cos, sin), apply_rope(x, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_a_qkv_slice(device, dtype):
    qkv = torch.randn(2, 5, 3 * 4 * 32, device=device, dtype=dtype)
    k = qkv[..., 128:256].view(2, 5, 4, 32)  # strided heads inside the fused projection
    cos, sin = tables(1, 5, 16, device)
    assert_close(fused_apply_rope(k, cos, sin), apply_rope(k, cos, sin))


def test_rope_rejects_bad_input(device):
    x = torch.randn(1, 3, 2, 8, device=device)
    cos, sin = tables(1, 3, 8, device)
    with pytest.raises(ValueError, match="even and at most"):
        fused_apply_rope(x, *tables(1, 3, 10, device))
    with pytest.raises(TypeError, match="float32"):
        fused_apply_rope(x, cos.half(), sin)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        fused_apply_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        fused_apply_rope(x, cos[:, :2], sin[:, :2])


def test_rope_bytes():
    x = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16)
    cos = torch.empty(1, 2, 8)
    assert rope_bytes(x, cos, cos) == 2 * 48 * 2 + 2 * 16 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary", [8, 4])
def test_rope_matcher(device, dtype, rotary):
    x = torch.randn(2, 3, 4, 8, device=device, dtype=dtype)
    check_match_runs(RoPEPattern(), apply_rope, (x, *tables(1, 3, rotary, device)))


def test_rope_matcher_swapped_operands(device):
    def swapped(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return sin[:, :, None, :] * torch.cat((-x2, x1), dim=-1) + cos[:, :, None, :] * x

    check_match_runs(RoPEPattern(), swapped, (torch.randn(1, 3, 2, 8, device=device), *tables(1, 3, 8, device)))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
def test_position_blocks_with_a_ragged_tail(device, norm, monkeypatch):
    """Positions per program double while >= 8 programs per SM remain (a 1-SM device here keeps the
    interpreter quick): 35 positions give 4 per program, and the last program holds only 3."""
    from difuse.patterns import rope
    from difuse.patterns.qk_norm import fused_qk_norm_rope, qk_norm_rope

    monkeypatch.setattr(rope, "sm_count", lambda device: 1)
    monkeypatch.setattr(rope, "_PLANS", rope.PlanCache())
    launched = []
    kernel = rope._norm_rope_kernel
    monkeypatch.setattr(rope, "_norm_rope_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or kernel[grid]})())
    x = torch.randn(1, 35, 3, 8, device=device)
    cos, sin = tables(1, 35, 8, device)
    if norm:
        w = torch.randn(8, device=device)
        assert_close(fused_qk_norm_rope(x, w, 1e-6, cos, sin), qk_norm_rope(x, w, 1e-6, cos, sin))
    else:
        assert_close(fused_apply_rope(x, cos, sin), apply_rope(x, cos, sin))
    assert launched == [(9, 1)]
