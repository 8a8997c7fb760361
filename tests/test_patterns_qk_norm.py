import pytest
import torch
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion.record import record
from difuse.patterns.qk_norm import (
    QKNormRoPEPattern,
    fused_qk_norm,
    fused_qk_norm_rope,
    qk_norm,
    qk_norm_rope,
    qk_norm_rope_bytes,
)
from difuse.patterns.rms_norm import RMSNormPattern

SHAPES = [(2, 5, 3, 64, 64), (1, 7, 5, 48, 32), (2, 3, 4, 24, 24)]  # (B, T, H, D, R)


def tables(T, R, device):
    angles = torch.randn(1, T, R // 2, device=device)
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_and_qk_norm_rope_match_references(device, dtype, shape):
    B, T, H, D, R = shape
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    weight = torch.randn(D, device=device, dtype=dtype)
    cos, sin = tables(T, R, device)
    assert_close(fused_qk_norm(x, weight, 1e-6), qk_norm(x, weight, 1e-6))
    assert_close(fused_qk_norm_rope(x, weight, 1e-6, cos, sin), qk_norm_rope(x, weight, 1e-6, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_on_a_qkv_slice(device, dtype):
    qkv = torch.randn(2, 5, 3 * 4 * 32, device=device, dtype=dtype)
    q = qkv[..., :128].view(2, 5, 4, 32)
    weight = torch.randn(32, device=device, dtype=dtype)
    cos, sin = tables(5, 16, device)
    assert_close(fused_qk_norm(q, weight, 1e-6), qk_norm(q, weight, 1e-6))
    assert_close(fused_qk_norm_rope(q, weight, 1e-6, cos, sin), qk_norm_rope(q, weight, 1e-6, cos, sin))


def test_qk_norm_rejects_bad_input(device):
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        fused_qk_norm(torch.randn(3, 8, device=device), torch.ones(8, device=device), 1e-6)
    cos, sin = tables(3, 8, device)
    with pytest.raises(ValueError, match="norm weight"):
        fused_qk_norm_rope(torch.randn(1, 3, 2, 8, device=device), torch.ones(4, device=device), 1e-6, cos, sin)


def test_qk_norm_rope_bytes():
    x = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16)
    w = torch.empty(8, dtype=torch.bfloat16)
    cos = torch.empty(1, 2, 8)
    assert qk_norm_rope_bytes(x, w, 1e-6, cos, cos) == 48 * 2 * 2 + 8 * 2 + 2 * 16 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matcher(device, dtype):
    x = torch.randn(2, 3, 4, 8, device=device, dtype=dtype)
    weight = torch.randn(8, device=device, dtype=dtype)
    match = check_match_runs(QKNormRoPEPattern(), qk_norm_rope, (x, weight, 1e-6, *tables(3, 8, device)))
    assert match.params["eps"].index == 2


def test_qk_norm_alone_is_an_rms_norm_match():
    graph = record(qk_norm, torch.randn(2, 3, 4, 8), torch.randn(8), 1e-6)
    assert QKNormRoPEPattern().match(graph) == []
    assert len(RMSNormPattern().match(graph)) == 1
