"""difuse.fusion: record PyTorch code into a SubGraph, fuse it, run it.

    graph = record(step, *args)                      # ATen-level SubGraph, run once eagerly
    scheduler = FusionScheduler(FusionConfig())      # patterns from difuse.patterns, if imported
    out = scheduler.dispatch(graph, *new_args)       # compiles on first use, then runs the Program
    print(scheduler.report())

Importing this package before Triton makes Triton kernels run under the CPU interpreter when no
CUDA device is present, so every kernel is executed for real on CPU-only machines and in CI.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .compiler import CompileError, KernelCompiler  # noqa: E402
from .config import FusionConfig  # noqa: E402
from .heuristics import Decision, FusionHeuristics  # noqa: E402
from .ir import OpNode, Ref, ScalarArg, SubGraph  # noqa: E402
from .pattern import Match, Pattern, register  # noqa: E402
from .record import RecordingError, record  # noqa: E402
from .program import Program  # noqa: E402
from .report import FusionReport  # noqa: E402
from .scheduler import FusionScheduler  # noqa: E402

__all__ = ["record", "RecordingError", "SubGraph", "OpNode", "Ref", "ScalarArg", "Pattern", "Match", "register",
           "FusionConfig", "FusionHeuristics", "Decision", "KernelCompiler", "CompileError", "FusionScheduler",
           "Program", "FusionReport"]
