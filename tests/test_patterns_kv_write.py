"""RoPE (and QK-norm) fused with the KV-cache write: kernel against the unfused reference, and the
patterns found in a recorded cached forward of each model family."""
import pytest
import torch
from pattern_checks import DTYPES, assert_close

import difuse.patterns  # noqa: F401  (registers the patterns)
from bench.step_model import TINY_OF, build_random_model
from difuse.fusion.config import FusionConfig
from difuse.fusion.record import record
from difuse.fusion.scheduler import FusionScheduler
from difuse.patterns.kv_write import (
    fused_qk_norm_rope_kv_write,
    fused_rope_kv_write,
    kv_write_bytes,
    qk_norm_rope_kv_write,
    rope_kv_write,
)
from difuse.runtime.kv_cache import StaticKVCache, key_padding_bias

# (B, T, H, D, R, L): odd head counts and head dims, partial rotary, a write into a longer buffer
SHAPES = [(1, 5, 3, 16, 16, 9), (2, 3, 2, 24, 8, 7), (2, 4, 5, 64, 64, 4)]


def step_tensors(shape, dtype, device):
    B, T, H, D, R, L = shape
    qkv = torch.randn(B, T, 3 * H, D, device=device, dtype=dtype)
    k, v = qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]  # strided views of a fused QKV output, as in the models
    angles = torch.randn(1, T, R // 2, device=device)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rows = torch.randperm(L, device=device)[:T]  # unsorted destinations
    keys = torch.randn(B, H, L, D, device=device, dtype=dtype)
    values = torch.randn(B, H, L, D, device=device, dtype=dtype)
    return k, v, cos, sin, rows, keys, values


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", [False, True])
def test_kv_write_matches_reference(device, dtype, shape, norm):
    k, v, cos, sin, rows, keys, values = step_tensors(shape, dtype, device)
    weight = torch.randn(shape[3], device=device, dtype=dtype)
    expected = (keys.clone(), values.clone())
    actual = (keys.clone(), values.clone())
    if norm:
        returned = fused_qk_norm_rope_kv_write(k, weight, cos, sin, rows, *actual, v, 1e-6)
        qk_norm_rope_kv_write(k, weight, cos, sin, rows, *expected, v, 1e-6)
    else:
        returned = fused_rope_kv_write(k, cos, sin, rows, *actual, v)
        rope_kv_write(k, cos, sin, rows, *expected, v)
    assert returned[0] is actual[0] and returned[1] is actual[1]  # written in place
    assert_close(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])  # values are copied bit for bit
    untouched = torch.ones(shape[-1], dtype=torch.bool, device=device)
    untouched[rows] = False
    assert torch.equal(actual[0][:, :, untouched], keys[:, :, untouched])


@pytest.mark.gpu
def test_kv_write_over_several_head_tiles(device, monkeypatch):
    """Several head tiles (the last one ragged) per block of positions."""
    from difuse.patterns import rope

    monkeypatch.setattr(rope, "sm_count", lambda device: 1)
    monkeypatch.setattr(rope, "TILE_VALUES", 128)  # 4 heads of 16 features of k and v per program
    monkeypatch.setattr(rope, "_PLANS", rope.PlanCache())
    k, v, cos, sin, rows, keys, values = step_tensors((1, 7, 5, 16, 16, 11), torch.float32, device)
    expected = rope_kv_write(k, cos, sin, rows, keys.clone(), values.clone(), v)
    for actual, reference in zip(fused_rope_kv_write(k, cos, sin, rows, keys.clone(), values.clone(), v), expected):
        assert_close(actual, reference)
    (plan,) = (plan for _, plan in rope._PLANS.plans.values())
    assert plan["grid"] == (7, 2)


def test_kv_write_skips_rows_outside_the_buffer(device):
    k, v, cos, sin, rows, keys, values = step_tensors((1, 3, 2, 8, 8, 4), torch.float32, device)
    rows = torch.tensor([0, 4, -1], device=device)
    written_keys, written_values = fused_rope_kv_write(k, cos, sin, rows, keys.clone(), values.clone(), v)
    assert torch.equal(written_keys[:, :, 1:], keys[:, :, 1:])
    assert torch.equal(written_values[:, :, 1:], values[:, :, 1:])
    assert torch.equal(written_values[:, :, 0], v[:, 0])


def test_kv_write_rejects_bad_buffers(device):
    k, v, cos, sin, rows, keys, values = step_tensors((1, 3, 2, 8, 8, 4), torch.float32, device)
    with pytest.raises(TypeError, match="rows written into it"):
        fused_rope_kv_write(k, cos, sin, rows, keys.half(), values, v)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        fused_rope_kv_write(k, cos, sin, rows, keys[:, :1], values, v)
    with pytest.raises(ValueError, match="rows must be"):
        fused_rope_kv_write(k, cos, sin, rows[:2], keys, values, v)
    with pytest.raises(ValueError, match="v_out must have"):
        fused_rope_kv_write(k, cos, sin, rows, keys, values.transpose(2, 3).contiguous().transpose(2, 3), v)


def test_kv_write_bytes():
    k = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16)
    cos, rows = torch.empty(1, 2, 8), torch.empty(2, dtype=torch.int64)
    keys = torch.empty(1, 3, 5, 8, dtype=torch.bfloat16)
    assert kv_write_bytes(k, cos, rows, keys, k) == 48 * 4 + 48 * 4 + 2 * 16 * 4 + 16


@pytest.mark.gpu
@pytest.mark.parametrize("family, pattern", [("llada-8b", "rope_kv_write"), ("llada2-mini", "qk_norm_rope_kv_write")])
def test_cached_forward_fuses_the_cache_write(device, tmp_path, family, pattern):
    model = build_random_model(TINY_OF[family], torch.device(device), torch.float32)
    B, L, T = 2, 12, 4
    caches = [StaticKVCache(model.num_layers, B, model.num_kv_heads, L, model.head_dim, torch.float32, device)
              for _ in range(2)]
    rows = torch.arange(4, 4 + T, device=device)
    bias = key_padding_bias(torch.tensor([0, 2], device=device), L, torch.float32)
    for cache in caches:
        cache.bind(rows, bias)
    ids = torch.randint(0, 50, (B, T), device=device)
    positions = rows[None]

    def forward(cache):
        return lambda ids, positions: model(ids, positions, cache)

    with torch.inference_mode():
        graph = record(forward(caches[0]), ids, positions)
        scheduler = FusionScheduler(FusionConfig(debug_mode=True, fallback_on_error=False, cache_dir=tmp_path))
        program = scheduler.compile(graph, ids, positions)
        fused = [g.name for g in program.fused_groups if g.kind == "pattern"]
        assert fused.count(pattern) == model.num_layers
        assert fused.count("rope") == (model.num_layers if pattern == "rope_kv_write" else 0)
        if model.num_kv_heads == model.layers[0].attn.n_heads:  # grouped-head SDPA may record a math chain on CUDA
            assert fused.count("attention") == model.num_layers
        # Recording and validation wrote the buffers: give both caches the same stale contents.
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            b.copy_(a.normal_())
        out = program(ids, positions)
        ref = forward(caches[1])(ids, positions)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for fused_buffer, eager_buffer in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(fused_buffer, eager_buffer, atol=1e-5, rtol=1e-5)


def test_alike_groups_are_tried_once(device, tmp_path, monkeypatch):
    """Every layer's cache write is alike: the scheduler tries and validates the kernel on the first
    layer's values only (capturing every layer's would copy the whole KV cache)."""
    from difuse.patterns.kv_write import RoPEKVWritePattern
    calls = []
    kernel = RoPEKVWritePattern.kernel
    monkeypatch.setattr(RoPEKVWritePattern, "kernel", lambda self, *a: calls.append(1) or kernel(self, *a))
    model = build_random_model(TINY_OF["llada-8b"], torch.device(device), torch.float32)
    cache = StaticKVCache(model.num_layers, 1, model.num_kv_heads, 8, model.head_dim, torch.float32, device)
    rows = torch.arange(2, 6, device=device)
    cache.bind(rows, key_padding_bias(torch.tensor([0], device=device), 8, torch.float32))
    ids = torch.randint(0, 50, (1, 4), device=device)
    with torch.inference_mode():
        graph = record(lambda ids, positions: model(ids, positions, cache), ids, rows[None])
        config = FusionConfig(debug_mode=True, fallback_on_error=False, profile=False, cache_dir=tmp_path)
        program = FusionScheduler(config).compile(graph, ids, rows[None])
    writes = [g for g in program.fused_groups if g.name == "rope_kv_write"]
    assert model.num_layers > 1 and len(writes) == model.num_layers and len(calls) == 1
    assert len({(g.record.decision, g.record.reason) for g in writes}) == 1
