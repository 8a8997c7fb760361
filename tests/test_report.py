import json

import pytest
import torch

from difuse.fusion import FusionConfig, FusionReport, FusionScheduler, record
from difuse.fusion.report import GroupRecord, copy_bandwidth
from difuse.patterns.rms_norm import rms_norm


@pytest.fixture
def profiled_report(tmp_path) -> FusionReport:
    def fn(x, w, eps: float, threshold: float):
        y = rms_norm(x, w, eps)
        return torch.softmax(y, dim=-1) > threshold

    args = (torch.randn(6, 48), torch.randn(48), 1e-6, 0.02)
    # the interpreter is ~500x slower than torch on CPU: a huge ratio keeps the kernels fused
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, profile=True, fusion_ratio=1e5), patterns=[])
    assert torch.equal(scheduler.dispatch(record(fn, *args), *args), fn(*args))
    return scheduler.report()


def test_report_lists_groups_with_times_bytes_and_bandwidth(profiled_report, tmp_path):
    d = profiled_report.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-able
    assert len(d["groups"]) == 2 and all(g["name"] == "generic" for g in d["groups"])
    for g in d["groups"]:
        assert g["decision"] and g["decided_by"] == "profiled" and g["t_fused"] > 0 and g["t_fallback"] > 0
        assert g["bytes_moved"] > 0 and g["gbps"] > 0 and g["fraction_of_copy_bandwidth"] > 0
        assert g["compile_seconds"] >= 0 and ("aten.mean.dim" in g["ops"] or "aten._softmax.default" in g["ops"])
    assert d["copy_bandwidth_gbps"] > 0
    text = str(profiled_report)
    assert text.splitlines()[0].startswith("FusionReport: 2 groups, 2 fused") and "launched serially" in text


def test_report_html_and_png(profiled_report, tmp_path):
    profiled_report.save_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    # two groups, unfused and fused bars, in a time chart and a traffic chart
    assert page.count("<svg") == 2 and page.count("<rect") == 8 and "generic" in page
    assert "time per call" in page and "memory traffic per call" in page
    pytest.importorskip("matplotlib")
    profiled_report.save_png(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unprofiled_report_draws_the_traffic_it_saves(tmp_path):
    """Without timings (static decisions, as on a CPU) the pictures still show what fusion saves."""
    def fn(x, w, eps: float):
        return rms_norm(x, w, eps) * 2.0

    args = (torch.randn(6, 48), torch.randn(48), 1e-6)
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[])
    scheduler.dispatch(record(fn, *args), *args)
    report = scheduler.report()
    [group] = report.groups
    unfused, fused = group.traffic
    assert fused == 2 * 6 * 48 * 4 + 48 * 4 < unfused  # x and w read, the output written, once
    assert "fused groups move" in report.summary()
    report.save_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 1 and "memory traffic per call" in page and "time per call" not in page
    pytest.importorskip("matplotlib")
    report.save_png(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to draw"):
        FusionReport().save_png(tmp_path / "empty.png")


def test_unprofiled_groups_print_without_times():
    report = FusionReport()
    report.add(GroupRecord(name="rms_norm", kind="pattern", nodes=7, decision=False, reason="fusion disabled"))
    assert "fusion disabled" in str(report) and report.to_dict()["groups"][0]["gbps"] is None


def test_copy_bandwidth_is_measured_once():
    assert copy_bandwidth() == copy_bandwidth() > 0
