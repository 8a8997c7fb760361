"""capture_graph: a failed CUDA-graph capture must leave streams, allocator and RNG usable."""
import contextlib

import pytest
import torch
from difuse.fusion import cuda_graphs
from difuse.fusion.cuda_graphs import capture_graph


class FakeCuda:
    """Stands in for the torch.cuda calls capture_graph makes, logging them in order."""

    def __init__(self, monkeypatch, end_error: Exception | None):
        self.log, self.current, self.end_error = [], "main", end_error
        fake = self

        class Graph:
            def capture_begin(self, pool=None):
                fake.log.append(("begin", fake.current, pool))

            def capture_end(self):
                fake.log.append(("end", fake.current))
                if fake.end_error is not None:
                    raise fake.end_error

        class Stream:
            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def stream(side):
            previous, fake.current = fake.current, "side"
            try:
                yield
            finally:
                fake.current = previous

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "fresh pool")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool",
                            lambda device, pool: fake.log.append(("release pool", device, pool)), raising=False)
        monkeypatch.setattr(cuda_graphs, "leave_capture_mode", lambda: fake.log.append(("leave capture mode",)))


def test_successful_capture_runs_the_body_on_a_side_stream_and_returns_the_graph(monkeypatch):
    cuda = FakeCuda(monkeypatch, end_error=None)
    graph = capture_graph(lambda: cuda.log.append(("body", cuda.current)), pool="shared pool")
    assert isinstance(graph, torch.cuda.CUDAGraph)
    assert cuda.log == [("begin", "side", "shared pool"), ("body", "side"), ("end", "side")]
    assert cuda.current == "main"


def test_body_error_ends_the_invalidated_capture_recovers_and_is_the_error_raised(monkeypatch):
    cuda = FakeCuda(monkeypatch, end_error=RuntimeError("capture invalidated"))

    def syncs_the_host():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="not permitted"):
        capture_graph(syncs_the_host)
    assert cuda.log == [("begin", "side", "fresh pool"), ("end", "side"),
                        ("release pool", 0, "fresh pool"), ("leave capture mode",)]
    assert cuda.current == "main"


def test_body_error_after_a_clean_end_needs_no_recovery(monkeypatch):
    cuda = FakeCuda(monkeypatch, end_error=None)
    def rejects_its_input():
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        capture_graph(rejects_its_input)
    assert cuda.log == [("begin", "side", "fresh pool"), ("end", "side")]
    assert cuda.current == "main"


def test_failing_end_recovers_and_raises_its_error(monkeypatch):
    cuda = FakeCuda(monkeypatch, end_error=RuntimeError("capture invalidated"))
    with pytest.raises(RuntimeError, match="capture invalidated"):
        capture_graph(lambda: None, pool="shared pool")
    assert cuda.log[-2:] == [("release pool", 0, "shared pool"), ("leave capture mode",)]
    assert cuda.current == "main"


def _syncs_the_host(x):
    return lambda: x.sum().item()


@pytest.mark.cuda
def test_failed_capture_leaves_rng_and_later_captures_usable():
    x = torch.randn(32, 50, device="cuda")
    stream = torch.cuda.current_stream()
    torch.cuda.manual_seed(7)
    expected = torch.randn(3, 40, device="cuda")

    torch.cuda.manual_seed(7)
    with pytest.raises(RuntimeError):
        capture_graph(_syncs_the_host(x))
    assert torch.cuda.current_stream() == stream
    assert torch.equal(torch.randn(3, 40, device="cuda"), expected)  # same stream of numbers as without it

    out = torch.zeros(3, 40, device="cuda")
    graph = capture_graph(lambda: out.copy_(torch.randn(3, 40, device="cuda")))
    graph.replay()
    first = out.clone()
    graph.replay()
    assert out.std() > 0.5 and not torch.equal(out, first)  # replays draw fresh numbers
    torch.rand(4, device="cuda")


@pytest.mark.cuda
def test_step_runner_falls_back_after_a_failed_capture_and_rng_still_works():
    from difuse.runtime.capture import StepRunner

    x = torch.randn(32, 50, device="cuda")
    out = torch.zeros((), device="cuda")

    def step(x):
        out.fill_(x.argmax().item())

    runner = StepRunner("syncing", step, (x,), use_cuda_graph=True)
    for _ in range(3):  # warm-up, failed capture (then run eagerly), eager run
        runner()
    assert runner.graph is None and runner.capture_error is not None
    assert out.item() == x.argmax().item()
    assert torch.randn(3, 40, device="cuda").shape == (3, 40)
