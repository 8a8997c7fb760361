"""Programmatic dependent launch of the step kernels (patterns._rows.early_launch): on only where
it exists, and a chain of dependent kernels launched early computes exactly what it computes
launched one after another, eagerly and replayed from a CUDA graph."""
import pytest
import torch

from difuse.fusion import FusionConfig, FusionHeuristics
from difuse.fusion.launch import launching_serially, serial_launches
from difuse.patterns import _rows, add_rms_norm, linear, rms_norm, swiglu


@pytest.fixture
def fresh_choice():
    _rows.early_launch.cache_clear()
    yield
    _rows.early_launch.cache_clear()


def test_early_launch_only_on_nvidia_hopper_and_newer(fresh_choice, monkeypatch):
    assert not _rows.early_launch(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not _rows.early_launch(torch.device("cuda:0"))
    _rows.early_launch.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _rows.early_launch(torch.device("cuda:0"))
    assert _rows.early_launch_options(torch.device("cuda:0")) == dict(PDL=True, launch_pdl=True)
    _rows.early_launch.cache_clear()
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: an MI300 reports capability 9.4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    assert not _rows.early_launch(torch.device("cuda:0"))


def test_difuse_pdl_0_turns_it_off(fresh_choice, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("DIFUSE_PDL", "0")
    assert _rows.early_launch_options(torch.device("cuda:0")) == dict(PDL=False, launch_pdl=False)


def test_serial_launches_plan_apart(fresh_choice, monkeypatch):
    monkeypatch.setattr(_rows, "early_launch", lambda device: True)
    plans = _rows.PlanCache()
    early = plans.get("shape", lambda: _rows.early_launch_options(torch.device("cuda")))
    with serial_launches():
        assert launching_serially()
        serial = plans.get("shape", lambda: _rows.early_launch_options(torch.device("cuda")))
    assert not launching_serially()
    assert early["PDL"] and not serial["PDL"] and not serial["launch_pdl"]
    assert plans.get("shape", lambda: None) is early


def test_the_profile_rule_times_kernels_serially(tmp_path):
    """Early launch is an overlap between a step's different kernels: the profile rule compares one
    kernel with its fallback, launched as it would be alone."""
    serially = []
    heuristics = FusionHeuristics(FusionConfig(cache_dir=tmp_path, profile=True))
    heuristics.profile_and_decide("group", lambda inputs: serially.append(launching_serially()),
                                  lambda inputs: None, lambda distinct: [], device="cpu")
    assert serially and all(serially)


def _layer_chain(x, residual, norm_w, gate_up_w, down_w):
    """A batch-1 FFN half-layer: each kernel reads what the one before it wrote."""
    normed = rms_norm.fused_rms_norm(x, norm_w, 1e-6)
    act = swiglu.fused_swiglu_packed(linear.fused_linear(normed, gate_up_w))
    out, hidden = add_rms_norm.fused_add_rms_norm(linear.fused_linear(act, down_w), residual, norm_w, 1e-6)
    return linear.fused_linear(out, gate_up_w[:4096]), hidden


@pytest.mark.cuda
def test_early_launched_chain_matches_serial_launches():
    if not _rows.early_launch(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper or newer GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    opts = dict(device="cuda", dtype=torch.bfloat16)
    x, residual = (torch.randn(32, 4096, generator=g, **opts) for _ in range(2))
    norm_w = torch.rand(4096, generator=g, **opts) + 0.5
    gate_up_w = torch.randn(2 * 12288, 4096, generator=g, **opts) / 64
    down_w = torch.randn(4096, 12288, generator=g, **opts) / 110
    args = (x, residual, norm_w, gate_up_w, down_w)

    def check(early_outputs):
        with serial_launches():
            expected = _layer_chain(*args)
        for got, want in zip(early_outputs, expected):
            assert torch.equal(got, want)

    check(_layer_chain(*args))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # plans and split-K workspaces exist: made by the call above
        captured = _layer_chain(*args)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g, **opts))
        graph.replay()
        check(captured)
