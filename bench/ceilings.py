"""Timing and the two device ceilings every step number is compared with, measured in the same
run: device-to-device copy bandwidth (bytes read + bytes written per second) and the dense matmul
rate at the model dtype, over a short burst and sustained for a second, with the SM clock while
the matmuls ran (bench.gpu_clocks): under a power limit the two can differ.

`time_calls` times each call separately (CUDA events on the GPU, the host clock on the CPU) after
warm-up, running `before` ahead of every call outside the timed region.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, ContextManager

import torch

from bench.gpu_clocks import ClockSampler, nvidia_smi_gpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], object], device: torch.device, warmup: int, iters: int,
               before: Callable[[], object] | None = None,
               sampler: ContextManager | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` untimed ones; `sampler` (a context
    manager, e.g. a ClockSampler) is open while the timed calls run, not during warm-up."""
    for _ in range(warmup):
        if before is not None:
            before()
        call()
    synchronize(device)
    with sampler or contextlib.nullcontext():
        return _timed(call, device, iters, before)


def _timed(call: Callable[[], object], device: torch.device, iters: int,
           before: Callable[[], object] | None) -> list[float]:
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            if before is not None:
                before()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        begin = time.perf_counter()
        call()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def summary(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_ms": statistics.median(ordered), "p10_ms": pick(0.1), "p90_ms": pick(0.9), "samples": len(ordered)}


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes per second of `dst.copy_(src)` over `nbytes` of random data, counting read + write."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    median_ms = statistics.median(time_calls(lambda: target.copy_(source), device, warmup=3, iters=iters))
    return 2 * source.numel() * source.element_size() / (median_ms / 1e3)


def matmul_rates(device: torch.device, size: int, dtype: torch.dtype, iters: int, sustain_s: float,
                 burst_sampler: ContextManager | None = None,
                 sustained_sampler: ContextManager | None = None) -> tuple[float, float]:
    """FLOP/s of a size^3 matmul on random inputs (2 * size^3 FLOPs per product): over `iters`
    products (a burst, at the clocks of a rested GPU), and over the second half of products run
    back to back for `sustain_s` seconds (the rate the GPU holds, under its power limit where that binds)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def product():
        return torch.matmul(a, b, out=out)

    burst_ms = statistics.median(time_calls(product, device, warmup=3, iters=iters, sampler=burst_sampler))
    calls = max(iters, math.ceil(sustain_s * 1e3 / burst_ms))
    sustained = time_calls(product, device, warmup=0, iters=calls, sampler=sustained_sampler)
    sustained_ms = statistics.median(sustained[calls // 2:])
    return 2 * size**3 / (burst_ms / 1e3), 2 * size**3 / (sustained_ms / 1e3)


# Seconds of back-to-back matmuls for the sustained rate: about as long as bench.step times a
# batch-16 configuration (50 steps of ~14 ms on an H200).
SUSTAIN_S = 1.0


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    copy_bytes, matmul_size, iters, sustain_s = (1 << 24, 256, 5, 0.05) if quick else (1 << 31, 8192, 20, SUSTAIN_S)
    ceilings = {"copy_bytes": copy_bytes, "matmul_size": matmul_size, "matmul_dtype": str(dtype).removeprefix("torch."),
                "copy_bandwidth_Bps": copy_bandwidth(device, copy_bytes, iters), "matmul_sustain_s": sustain_s}
    gpu = nvidia_smi_gpu(device)
    burst, sustained = ClockSampler(gpu, interval_ms=10), ClockSampler(gpu)
    ceilings["matmul_flops"], ceilings["matmul_flops_sustained"] = matmul_rates(
        device, matmul_size, dtype, iters, sustain_s, burst, sustained)
    ceilings.update({f"matmul_{name}": value for name, value in burst.summary().items()})
    ceilings.update({f"matmul_sustained_{name}": value for name, value in sustained.summary().items()})
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy and matmul buffers are gone: give the model their memory
    return ceilings
