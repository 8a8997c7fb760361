"""Profile timing modes (CUDA graph vs Python launches) and stochastic-pattern validation."""
import pytest
import torch
from difuse.fusion import (
    FusionConfig,
    FusionScheduler,
    Match,
    Pattern,
    heuristics,
    record,
)
from difuse.patterns.rms_norm import rms_norm


class NoisyArgmax(Pattern):
    """Test-local stochastic pattern: argmax along the last axis, whose 'kernel' samples an index."""

    name = "test_noisy_argmax"
    priority = 10
    stochastic = True

    def __init__(self, kernel=None):
        self._kernel = kernel

    def match(self, graph):
        return [Match(self.name, (i,), (node.inputs[0],), (node.outputs[0],))
                for i, node in enumerate(graph.nodes) if node.op == "aten.argmax.default"]

    def reference(self, x):
        return x.argmax(-1)

    def kernel(self, x):
        if self._kernel:
            return self._kernel(x)
        return torch.randint(0, x.shape[-1], x.shape[:-1], device=x.device)

    def output_ranges(self, x):
        return [(0, x.shape[-1] - 1)]

    def bytes_moved(self, x):
        return x.numel() * x.element_size()


def pick(x):
    return torch.argmax(x, -1)


def _pick_scheduler(tmp_path, pattern, **config):
    config = FusionConfig(cache_dir=tmp_path, debug_mode=True, fallback_on_error=False, **config)
    return FusionScheduler(config, patterns=[pattern])


def test_stochastic_pattern_is_validated_by_shape_dtype_and_range_not_values(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 50)
    scheduler = _pick_scheduler(tmp_path, NoisyArgmax(), profile=True, fusion_ratio=1e5)
    out = scheduler.dispatch(record(pick, x), x)
    assert torch.equal(out, pick(x))  # the first call returns the reference replay
    [group] = scheduler.report().groups
    assert group.decision and group.decided_by == "profiled" and group.t_fused > 0 and group.t_fallback > 0
    sample = scheduler.dispatch(record(pick, x), x)
    assert sample.shape == (6,) and sample.dtype == torch.int64 and 0 <= sample.min() <= sample.max() < 50


def test_stochastic_pattern_with_out_of_range_outputs_is_rejected(tmp_path):
    x = torch.randn(6, 50)
    out_of_range = NoisyArgmax(lambda x: torch.full(x.shape[:-1], x.shape[-1]))
    with pytest.raises(ValueError, match="outside the valid range"):
        _pick_scheduler(tmp_path, out_of_range).dispatch(record(pick, x), x)
    wrong_dtype = NoisyArgmax(lambda x: torch.zeros(x.shape[:-1], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        _pick_scheduler(tmp_path, wrong_dtype).dispatch(record(pick, x), x)


def test_deterministic_pattern_values_are_still_compared(tmp_path):
    class NotFlagged(NoisyArgmax):
        stochastic = False

    x = torch.randn(64, 50)
    with pytest.raises(ValueError, match="elements differ"):
        _pick_scheduler(tmp_path, NotFlagged()).dispatch(record(pick, x), x)


def test_profile_mode_is_validated_and_graph_falls_back_to_eager_off_cuda():
    with pytest.raises(ValueError, match="profile_mode"):
        FusionConfig(profile_mode="cudagraph")
    assert FusionConfig().profile_mode == "graph"
    assert heuristics.timing_mode("graph", "cpu") == "eager" and heuristics.timing_mode("eager", "cuda") == "eager"
    assert heuristics.timing_mode("graph", "cuda") == "graph"


def _norm_run(tmp_path, mode):
    args = (torch.randn(4, 40), torch.randn(40), 1e-6)
    s = FusionScheduler(FusionConfig(cache_dir=tmp_path, profile=True, profile_mode=mode, fusion_ratio=1e5),
                        patterns=[])
    torch.testing.assert_close(s.dispatch(record(rms_norm, *args), *args), rms_norm(*args))
    [group] = s.report().groups
    return group


def test_graph_mode_times_rotated_input_copies_and_persists_per_mode(tmp_path, monkeypatch):
    timed = []

    def fake_graph_timer(calls):
        for call in calls:
            call()
        timed.append([call.args[0] for call in calls])
        return 1e-6 * len(timed)  # fused is timed first: 1 us fused vs 2 us unfused

    monkeypatch.setattr(heuristics, "timing_mode", lambda requested, device: requested)
    monkeypatch.setattr(heuristics, "rotation_copies", lambda footprint, device: 3)
    monkeypatch.setattr(heuristics, "time_in_cuda_graph", fake_graph_timer)
    group = _norm_run(tmp_path, "graph")
    assert group.decision and group.timing == "graph" and group.decided_by == "profiled"
    assert (group.t_fused, group.t_fallback) == (1e-6, 2e-6) and "measured (graph)" in group.reason
    fused_sets, fallback_sets = timed
    assert len(fused_sets) == 3 and fused_sets == fallback_sets  # both candidates see the same copies
    pointers = {t.data_ptr() for s in fused_sets for t in s}
    assert len(pointers) == 3 * len(fused_sets[0])  # every copy has its own memory

    assert _norm_run(tmp_path, "graph").decided_by == "disk"
    eager = _norm_run(tmp_path, "eager")  # another mode: measured again, not the graph decision
    assert eager.decided_by == "profiled" and eager.timing == "eager" and len(timed) == 2


def test_report_aggregates_occurrences_per_shape_bucket(tmp_path):
    def two_norms(x, y, w, eps: float):
        return rms_norm(x, w, eps), rms_norm(y, w, eps)

    args = (torch.randn(4, 40), torch.randn(4, 40), torch.randn(40), 1e-6)
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, max_nodes=7), patterns=[])
    scheduler.dispatch(record(two_norms, *args), *args)
    report = scheduler.report()
    assert len(report.groups) == 2
    [(row, count)] = report.rows()
    assert count == 2 and row.shape == "4x40 float32"
    lines = str(report).splitlines()
    assert lines[0].startswith("FusionReport: 2 groups, 2 fused; 1 distinct")
    assert "count" in lines[2] and "fused [us]" in lines[2] and len(lines) == 4
    d = report.to_dict()
    assert len(d["groups"]) == 2 and [r["count"] for r in d["rows"]] == [2]


@pytest.mark.cuda
def test_graph_timing_sees_through_launch_overhead(tmp_path):
    x = torch.randn(32, 4096, device="cuda")  # 512 KiB: ~2 us of GPU time, more to launch from Python
    per_call = heuristics.time_in_cuda_graph([lambda: x.mul(2)])
    assert 0 < per_call < 10e-6


@pytest.mark.cuda
def test_kernel_that_syncs_the_host_is_rejected_in_graph_mode(tmp_path):
    def syncing(x):
        return torch.full(x.shape[:-1], int(x.argmax(-1).max().item()), device=x.device)

    x = torch.randn(32, 50, device="cuda")
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, profile=True), patterns=[NoisyArgmax(syncing)])
    scheduler.dispatch(record(pick, x), x)
    [group] = scheduler.report().groups
    assert not group.decision and "CUDA graph" in group.reason
    assert torch.randn(3, 40, device="cuda").shape == (3, 40)  # the failed capture left the RNG usable


def test_input_replicas_keep_the_layout_of_views():
    from difuse.fusion.scheduler import replica

    base = torch.randn(2, 5, 3, 4)
    view = base.unbind(2)[1]  # strides with gaps, storage offset 4
    copy = replica(view)
    assert copy.stride() == view.stride() and copy.storage_offset() == view.storage_offset()
    assert torch.equal(copy, view) and copy.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()


@pytest.mark.gpu
def test_sampled_confidence_passes_debug_validation_in_the_scheduler(device, tmp_path):
    from difuse.patterns.confidence import token_confidence
    from difuse.patterns.confidence_patterns import SampledTokenConfidencePattern

    logits = torch.randn(3, 40, device=device)
    graph = record(token_confidence, logits, 0.7)
    scheduler = _pick_scheduler(tmp_path, SampledTokenConfidencePattern(), profile=True, fusion_ratio=1e5)
    scheduler.dispatch(graph, logits, 0.7)
    [group] = scheduler.report().groups
    assert group.name == "sampled_token_confidence" and group.decision
    confidence, token = scheduler.dispatch(graph, logits, 0.7)
    assert confidence.shape == token.shape == (3,) and bool(((confidence > 0) & (confidence <= 1 + 1e-5)).all())
    assert 0 <= int(token.min()) and int(token.max()) < 40


@pytest.mark.parametrize("failing, fused, timing", [(1, False, "graph"), (2, True, "eager")])
def test_capture_failures_in_graph_mode(tmp_path, monkeypatch, failing, fused, timing):
    """An uncapturable fused kernel is rejected; uncapturable unfused ops are timed eagerly instead."""
    attempts = []

    def capture_fails_on_attempt(calls):
        attempts.append(calls)
        if len(attempts) == failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return 1e-9

    monkeypatch.setattr(heuristics, "timing_mode", lambda requested, device: requested)
    monkeypatch.setattr(heuristics, "rotation_copies", lambda footprint, device: 2)
    monkeypatch.setattr(heuristics, "time_in_cuda_graph", capture_fails_on_attempt)
    group = _norm_run(tmp_path, "graph")
    assert group.decision == fused and group.timing == timing
    assert ("cannot be captured" in group.reason) == (not fused)
