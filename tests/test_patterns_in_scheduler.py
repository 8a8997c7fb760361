"""The pattern library inside the FusionScheduler: a recorded decode step of a tiny block."""
import pytest
import torch
from tiny_block import HIDDEN, MASK_ID, TinyBlock, decode_step, rope_tables

import difuse.patterns  # noqa: F401  (registers the patterns)
from difuse.fusion.config import FusionConfig
from difuse.fusion.record import record
from difuse.fusion.scheduler import FusionScheduler


@pytest.mark.gpu
def test_decode_step_runs_on_pattern_kernels(device, tmp_path):
    step = decode_step(TinyBlock().to(device))
    T = 5
    cos, sin = (t.to(device) for t in rope_tables(T))
    tokens = torch.full((1, T), MASK_ID, device=device)
    tokens[0, 1] = 3
    args = (torch.randn(1, T, HIDDEN, device=device), cos, sin, torch.arange(T, device=device), tokens, 1e-6, 0.5,
            MASK_ID)
    graph = record(step, *args[:4], tokens.clone(), *args[5:])
    scheduler = FusionScheduler(FusionConfig(debug_mode=True, fallback_on_error=False, cache_dir=tmp_path))
    program = scheduler.compile(graph, *args[:4], tokens.clone(), *args[5:])
    fused = sorted(g.name for g in program.fused_groups if g.kind == "pattern")
    assert fused == ["add_rms_norm", "add_rms_norm", "attention", "confidence_threshold_select", "rms_norm", "rope",
                     "rope", "swiglu"]
    fused_tokens, eager_tokens = tokens.clone(), tokens.clone()
    out = program(*args[:4], fused_tokens, *args[5:])
    ref = step(*args[:4], eager_tokens, *args[5:])
    torch.testing.assert_close(out["hidden"], ref["hidden"])
    assert torch.equal(out["accepted"], ref["accepted"]) and torch.equal(fused_tokens, eager_tokens)
    assert not torch.equal(fused_tokens, tokens)  # the block really was written in place
