"""StepRunner: runs one denoise step shape on its static argument tensors, eagerly or through
the fusion compiler, and on CUDA replays it from a captured CUDA graph.

Lifecycle on CUDA: the first calls are real steps run on a side stream (warm-up: lazy library
init, and with fusion the recording plus one dispatch, so kernel compilation, autotuning and
the fusion profile decisions all happen outside capture); the next call captures the step and
replays it; later calls only replay. A failed capture is logged with its reason and
the runner keeps running the step without a graph (capture_graph leaves streams, allocator and
the RNG usable after the failure).
"""
from __future__ import annotations

import logging

import torch
from difuse.fusion.cuda_graphs import capture_graph

log = logging.getLogger("difuse.runtime")


class StepRunner:
    def __init__(self, name: str, fn, args: tuple, scheduler=None, use_cuda_graph: bool = False,
                 graph_pool=None):
        self.name = name
        self.fn = fn
        self.args = args
        self.scheduler = scheduler
        self.program = None
        self.use_cuda_graph = use_cuda_graph
        self.graph_pool = graph_pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None
        self.calls = 0
        self.warm_up_calls = 1 if scheduler is None else 2  # fused: the recording, then one dispatch

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.use_cuda_graph and self.calls < self.warm_up_calls:
            self._warm_up()
        elif self.use_cuda_graph and self.capture_error is None:
            self._capture()
            (self.graph.replay() if self.graph is not None else self._run())
        else:
            self._run()
        self.calls += 1

    def _run(self):
        if self.scheduler is None:
            return self.fn(*self.args)
        if self.program is None:
            # recording runs the step once for real: this call's step is done when it returns
            from difuse.fusion.record import record_with_output

            self.program, out = record_with_output(self.fn, *self.args)
            return out
        return self.scheduler.dispatch(self.program, *self.args)

    def _warm_up(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self):
        try:
            graph = capture_graph(self._run, pool=self.graph_pool)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager replay
            self.capture_error = f"{type(error).__name__}: {error}"
            log.warning("CUDA graph capture of step %s failed, running it without a graph: %s",
                        self.name, self.capture_error)
            torch.cuda.synchronize()
            return
        self.graph = graph
