"""bench.verdict: the benchmark targets checked against result files."""
import json

from bench import verdict


def _kernel(pattern, shape, provider, us, of_copy=0.9, us_graph=None):
    return {"pattern": pattern, "shape": shape, "provider": provider, "us_best": us,
            "us_graph": us if us_graph is None else us_graph, "of_copy_bw": of_copy, "checked": "ok"}


def _kernels(tmp_path, results):
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"meta": {"device": "GPU"}, "results": results}))
    return path


def _step_row(batch, config, ms, **extra):
    return {"batch": batch, "config": config, "median_ms": ms, "status": "ok", "device": "GPU",
            "tokens_per_s": 3 * batch / ms * 1e3, "tokens_per_step": 3.0, **extra}


def test_token_rows_of_shape_labels():
    assert verdict.token_rows("rms_norm", "4096x2048") == 4096
    assert verdict.token_rows("attention", "128x32x768") == 4096  # sequences x block rows


def test_kernel_targets(tmp_path, capsys):
    met = [
        _kernel("rms_norm", "4096x4096", "fused", 17.0, 0.95), _kernel("rms_norm", "4096x4096", "compile", 20.0),
        _kernel("swiglu", "4096x12288", "fused", 70.77, 1.02), _kernel("swiglu", "4096x12288", "compile", 70.76),
        _kernel("rms_norm", "32x4096", "fused", 3.0, 0.1),  # few rows: no bandwidth target
        _kernel("confidence_threshold_select", "32x126464", "fused", 30.0, us_graph=9.7),
    ]
    assert verdict.main([str(_kernels(tmp_path, met))]) == 0
    assert "a tie" in capsys.readouterr().out
    missed = met[:2] + [
        _kernel("add_rms_norm", "4096x2048", "fused", 17.4, 0.93), _kernel("add_rms_norm", "4096x2048", "compile", 17.1),
        _kernel("rope", "4096x32x128", "fused", 20.0, 0.80), _kernel("rope", "4096x32x128", "compile", 25.0),
        _kernel("confidence_threshold_select", "32x126464", "fused", 25.0),
    ]
    assert verdict.main([str(_kernels(tmp_path, missed))]) == 1
    out = capsys.readouterr().out
    assert "MISSED  add_rms_norm 4096x2048" in out and "MISSED  rope 4096x32x128: 80%" in out
    assert "MISSED  confidence selection 32x126464: 25.0 us" in out and "3 target(s) missed" in out


def _step(tmp_path, b1_ms, b16_matmul_fraction):
    rows = []
    for batch, fused, mm in ((1, b1_ms, 0.1), (16, 14.0, b16_matmul_fraction), (64, 50.0, 0.75)):
        rows += [_step_row(batch, "eager", 3 * fused), _step_row(batch, "compile", fused * 1.1),
                 _step_row(batch, "graph", fused * 1.4),
                 _step_row(batch, "fused_graph", fused, x_weight_floor=fused / 5.0, weight_floor_ms=5.0,
                           matmul_fraction=mm)]
    path = tmp_path / "step.json"
    path.write_text(json.dumps({"model": "llada-8b", "rows": rows}))
    return path


def test_step_targets(tmp_path, capsys):
    assert verdict.main([str(_step(tmp_path, 5.4, 0.72))]) == 0
    out = capsys.readouterr().out
    assert "met     batch 1 fused + graph: 5.400 ms, 1.08x the weight floor" in out
    assert "batch  16 fused + graph: 3429 tokens/s at 3 tokens per step" in out and "every target met" in out
    assert verdict.main([str(_step(tmp_path, 6.0, 0.65))]) == 1
    out = capsys.readouterr().out
    assert "MISSED  batch 1 fused + graph: 6.000 ms, 1.20x" in out
    assert "MISSED  batch 16 fused + graph: model FLOP/s 65%" in out and "2 target(s) missed" in out
