"""serial_launches: time kernels launched one after another.

The pattern kernels launch with programmatic dependent launch on Hopper GPUs (difuse.patterns._rows
.early_launch): each may start while the kernel before it finishes. That overlap is a property of
the step, not of one kernel, and a kernel launched early right after another launch of itself can
even run slower than alone. So kernels are compared with their fallbacks (the fusion profile rule,
bench.kernels) inside serial_launches(), and the step gains the overlap on top.
"""
from __future__ import annotations

import contextlib

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
