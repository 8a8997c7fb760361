"""Shared host-side helpers of the pattern kernels: input validation and row views.

Row kernels address row r of a tensor [..., N] as (r // inner) * stride_outer + (r % inner) *
stride_inner, so the leading dims need to collapse into at most two strided dims. That covers
contiguous tensors and the common views (q/k/v slices of a fused QKV output, gate/up halves of a
fused gate_up output, a [B, N, V] logits slice) without a copy. Anything else is copied once.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from difuse.fusion.launch import launching_serially

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RowView:
    """A tensor [..., N] seen as rows: row r starts at (r // inner) * stride_outer + (r % inner) * stride_inner."""

    tensor: torch.Tensor  # the tensor whose storage the kernel reads (maybe a contiguous copy)
    rows: int
    inner: int
    stride_outer: int
    stride_inner: int


def _collapse(sizes: list[int], strides: list[int]) -> list[tuple[int, int]]:
    """Merge adjacent dims whose strides nest ((size, stride) pairs, outermost first)."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def row_view(t: torch.Tensor) -> RowView:
    """View t [..., N] (unit stride in the last dim) as up to two strided row dims, copying only if needed."""
    if t.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar")
    rows = t.numel() // t.shape[-1] if t.shape[-1] else 0
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    dims = _collapse(list(t.shape[:-1]), list(t.stride()[:-1]))
    if len(dims) > 2:
        t = t.contiguous()
        dims = _collapse(list(t.shape[:-1]), list(t.stride()[:-1]))
    if not dims:
        return RowView(t, rows, 1, 0, 0)
    if len(dims) == 1:
        return RowView(t, rows, 1, dims[0][1], 0)
    (_, outer_stride), (inner, inner_stride) = dims
    return RowView(t, rows, inner, outer_stride, inner_stride)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_runtime_device(t: torch.Tensor) -> None:
    """Triton runs on CUDA, or on CPU under the interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"fused kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {t.device}"
    )


def interpreter_widens_dot(dtype: torch.dtype) -> bool:
    """The Triton interpreter's tl.dot returns garbage for bf16 operands: kernels widen them to fp32
    there (exact: bf16 products are exact in fp32) and dot in "ieee" precision. GPUs keep bf16."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints (triton.cdiv is a JIT function: ~1.5 us per host call)."""
    return -(-a // b)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (an H100's 132 under the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a launch plan depends on: shape, strides, dtype, device (not the data or its address)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


# Scratch of the split kernels (partial results, arrival counts) per key, shared by every launch of
# that shape on the stream: run such launches on one stream. Never dropped, unlike plans: a
# captured CUDA graph keeps their addresses.
_SPLIT_WORKSPACES: dict = {}


def split_workspace(key: tuple, build) -> tuple:
    """The tensors `build()` makes for `key` (which names the kernel, device and every size), made once."""
    if key not in _SPLIT_WORKSPACES:
        _SPLIT_WORKSPACES[key] = build()
    return _SPLIT_WORKSPACES[key]


class PlanCache:
    """Launch plans per tensor_key tuple, so a repeated call skips validation and planning.
    Bounded: a workload cycling through very many shapes replans instead of growing forever."""

    def __init__(self, limit: int = 4096):
        self.plans: dict = {}
        self.limit = limit

    def get(self, key, build):
        key = (key, launching_serially())  # a plan fixes whether the launch is early
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= self.limit:
                self.plans.clear()
            plan = self.plans[key] = build()
        return plan


# ---------------------------------------------------------------------------------------------
# Programmatic dependent launch (Hopper and newer). A kernel launched with it may be scheduled
# before the previous kernel on the stream has finished, onto SMs that kernel leaves free; it waits
# for the previous kernel's writes before its first load. Between the many short kernels of a
# batch-1 denoise step that hides launches and ramp-ups behind the kernel before. DIFUSE_PDL=0
# turns it off.
#
# Measured on an H200 at LLaDA-8B batch 1 (bench.step, two runs each): the captured step took
# 4.81 ms instead of 4.91. Asking L2 for the next kernel's weights before the wait (Hopper's bulk
# prefetch) lost: 5.14 ms against 4.74 with 32 MB per linear launch, 4.79 with 8 MB; for attention's
# cached keys it changed nothing (bench/results/ab-llada-8b-b1-l2-prefetch-h200.log). Launched
# early, a small kernel costs the step little: rotating q inside the attention kernel instead of
# in its own left the step as it was (4.728 against 4.723 ms;
# bench/results/ab-llada-8b-b1-rope-in-attention-h200.log), and SwiGLU in the gate_up kernel
# made it slower (patterns/linear.py). But a kernel launched early right after another launch of
# itself can run slower than alone (the batch-1 attention output projection: 16.2 us, not 13.1),
# so kernels are timed against their fallbacks under difuse.fusion.launch.serial_launches(). The
# confidence, MoE and MoE-router kernels launch normally: launched early they made the LLaDA-MoE
# batch-1 step slower (H200, bench.ab, two rounds: 3.289 ms against 3.280).


def is_nvidia_hopper_or_newer(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9 or more (ROCm GPUs are "cuda" devices too, and an
    MI300 reports capability 9.4)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def early_launch(device: torch.device) -> bool:
    """Whether step kernels on `device` are launched with programmatic dependent launch."""
    return is_nvidia_hopper_or_newer(device) and os.environ.get("DIFUSE_PDL", "1") != "0"


def stream_hint_options(enabled: bool) -> dict:
    """LOAD_EVICTION and STORE_CACHE of a kernel that reads each value once and writes it once:
    loads ask L2 to evict them first and stores stream (.cs); both the defaults ("") when not enabled."""
    return dict(LOAD_EVICTION="evict_first" if enabled else "", STORE_CACHE=".cs" if enabled else "")


def early_launch_options(device: torch.device) -> dict:
    """Launch keywords of a kernel that calls wait_for_previous_kernel(PDL) before its first load or store."""
    enabled = early_launch(device) and not launching_serially()
    return dict(PDL=enabled, launch_pdl=enabled)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL, block until the previous kernel on the stream has finished and its writes are
    visible (every load and store must come after this), then let the next kernel start launching
    onto SMs this one leaves free. Without PDL a launch waits anyway and this is nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
