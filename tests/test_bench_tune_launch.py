"""bench.tune_launch on the CPU interpreter: a --grid of your own replaces the built-in sweep,
names a module's constants only, and the module's defaults are restored afterwards."""
import argparse

import pytest
import torch

from bench import tune_launch
from difuse.patterns import linear, moe, rms_norm, rope, swiglu


def test_parse_grid_reads_names_and_numbers():
    assert tune_launch.parse_grid("BLOCK_K=32,64 SPLITS_UNTIL_PROGRAMS=0.5") == \
        {"BLOCK_K": [32, 64], "SPLITS_UNTIL_PROGRAMS": [0.5]}
    for bad in ("block_k=32", "BLOCK_K", "BLOCK_K="):
        with pytest.raises(argparse.ArgumentTypeError):
            tune_launch.parse_grid(bad)


def test_a_grid_of_your_own_is_swept_and_the_defaults_come_back(capsys):
    default = linear.BLOCK_K
    tune_launch.main(["linear", "--quick", "--grid", "BLOCK_K=16,32"])
    printed = capsys.readouterr().out
    assert "BLOCK_K=16" in printed and "BLOCK_K=32" in printed
    assert linear.BLOCK_K == default and tune_launch.GRID_OVERRIDE is None


def test_a_grid_naming_an_unknown_constant_stops_with_its_name():
    with pytest.raises(SystemExit, match="NO_SUCH_KNOB"):
        tune_launch.main(["linear", "--quick", "--grid", "NO_SUCH_KNOB=1"])


@pytest.mark.parametrize("kernel, module, setting, titles", [
    ("norm", rms_norm, "ROW_VALUES=32", ("== rms_norm 5x64", "== add_rms_norm 5x64")),
    ("swiglu", swiglu, "VALUES_PER_WARP=32", ("== swiglu 5x96", "== swiglu_packed 5x192")),
    ("moe", moe, "BLOCK_M_FEW=32", ("== moe 5x32 spread", "== moe 5x32 skewed")),
    ("rope", rope, "NORM_TILE_VALUES=1024", ("== rope 5x4x32", "== rope_kv_write 5x4x32", "== qk_norm_rope 5x4x32",
                                            "== qk_norm_rope_kv_write 5x4x32")),
])
def test_a_sweep_times_every_form_and_restores_the_defaults(capsys, kernel, module, setting, titles):
    constant = setting.partition("=")[0]
    default = getattr(module, constant)
    tune_launch.main([kernel, "--quick"])
    printed = capsys.readouterr().out
    assert all(title in printed for title in titles)
    assert setting in printed and getattr(module, constant) == default


def test_the_compile_baseline_may_recompile_for_every_shape(monkeypatch):
    """Past dynamo's default limit of 8 shapes the compiled reference would run eager unannounced
    (tune_launch linear times 8+ shapes of one reference)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    tune_launch.main(["norm", "--quick", "--grid", "ROW_VALUES=32"])
    assert torch._dynamo.config.recompile_limit >= 1024
