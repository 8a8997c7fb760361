"""The MoE benchmark runs end to end at tiny shapes (on CPU under the Triton interpreter)."""
import json

import bench.moe


def test_bench_moe_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.moe, "RESULTS", tmp_path)
    bench.moe.main(["--quick", "--dtype", "float32"])
    (result,) = tmp_path.glob("moe-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert rows and all(row["fused_us"] > 0 and row["bytes"] > 0 for row in rows)
    assert {row["routing"] for row in rows} == set(bench.moe.ROUTINGS)
    assert "fused us" in capsys.readouterr().out
