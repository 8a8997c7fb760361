"""serial_launches: time kernels launched one after another.

The pattern kernels launch with programmatic dependent launch on Hopper GPUs (difuse.patterns._rows
.early_launch): each may start while the kernel before it finishes. That overlap is a property of
the step, not of one kernel, and a kernel launched early right after another launch of itself can
even run slower than alone. So kernels are compared with their fallbacks (the fusion profile rule,
bench.kernels) inside serial_launches(), and the step gains the overlap on top.

ieee_quiet: under the CPU interpreter a kernel's arithmetic is numpy's, which warns where IEEE
arithmetic on a GPU (and torch's on any device) silently gives inf or NaN.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

_serial = False


@contextlib.contextmanager
def serial_launches():
    """Kernels planned inside this block launch serially (launch plans are kept apart from the
    early-launch ones, so the block leaves no trace on later launches)."""
    global _serial
    saved, _serial = _serial, True
    try:
        yield
    finally:
        _serial = saved


def launching_serially() -> bool:
    return _serial


def ieee_quiet(device: torch.device | str):
    """Context of a launch on `device`: on the CPU, numpy's floating-point warnings are off, so
    1/0, overflow to inf and inf - inf (often in lanes masked later) pass silently, as on a GPU."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return np.errstate(all="ignore") if kind == "cpu" else contextlib.nullcontext()
