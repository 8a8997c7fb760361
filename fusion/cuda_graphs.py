"""capture_graph: capture a CUDA graph so that a failed capture leaves the process usable.

Why not `torch.cuda.graph` or bare capture_begin/capture_end: when the body does something a
capture forbids (a host sync such as `.item()`), CUDA invalidates the capture and `capture_end`
raises while ending it. Torch then skips two things that only a successful `capture_end` does:
  * `torch.cuda.graph.__exit__` never leaves its capture stream, so it stays current;
  * the CUDA generators registered with the graph (always the default one) never run their capture
    epilogue, so they still believe they are capturing, and every random op afterwards outside a
    capture fails with "Offset increment outside graph capture encountered unexpectedly".
capture_graph always ends the capture, restores the stream, and on failure takes the default
generator out of capture mode (its seed and offset are not touched by a capture, so random
streams continue exactly where they were) before re-raising.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def capture_graph(body: Callable[[], object], pool=None) -> torch.cuda.CUDAGraph:
    """Capture `body()` into a new CUDA graph (in memory pool `pool`, e.g. from
    torch.cuda.graph_pool_handle()) on a side stream and return it. On failure the capture is
    ended and discarded, the process is left ready for eager work and further captures, and the
    body's error (or, if only the end failed, the end's error) is raised."""
    pool = torch.cuda.graph_pool_handle() if pool is None else pool  # known, so a failed end can release it
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()  # pending eager work must not run into the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool)
        try:
            body()
        except BaseException:
            _end_capture(graph, pool)  # its failure is a consequence: the body's error says why
            raise
        end_error = _end_capture(graph, pool)
        if end_error is not None:
            raise end_error
    torch.cuda.current_stream().wait_stream(side)
    return graph


def _end_capture(graph: torch.cuda.CUDAGraph, pool) -> RuntimeError | None:
    """End the capture. If ending fails (the capture was invalidated), undo what only a successful
    end undoes and return the error."""
    try:
        graph.capture_end()
    except RuntimeError as error:
        # the allocator would otherwise keep the pool among the captures under way, and while any
        # is, it defers reclaiming blocks freed across streams
        with contextlib.suppress(RuntimeError):  # raises if the end got past this step
            torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
        leave_capture_mode()
        return error
    return None


def leave_capture_mode() -> None:
    """Run the default CUDA generator's capture epilogue that a failed capture skipped, by capturing
    (and discarding) one tiny kernel: a successful capture's end sets the generator's capturing flag
    back to false and leaves its seed and offset as they were."""
    scratch = torch.zeros(1, device="cuda")  # allocated outside the capture
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin()
        scratch.add_(1)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
