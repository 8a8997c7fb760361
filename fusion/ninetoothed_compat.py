"""Make stock ninetoothed run under Triton's CPU interpreter (applied only without CUDA).

Two gaps (reference/ninetoothed.md §3): ninetoothed queries the active GPU driver while building a
kernel (device properties shape its autotune space), and Triton >= 3.4's interpreter turns the
`triton.language.constexpr` annotations ninetoothed emits into strings that it no longer
recognises as constexpr. We register a driver stub with H100-like properties and normalise those
annotation strings. Neither affects what the interpreter computes.
"""
from __future__ import annotations

import os

import torch

_APPLIED = False


class _DeviceUtils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132, "warpSize": 32}


class _InterpreterDriver:
    """The subset of a Triton GPU driver that ninetoothed touches at build time."""

    utils = _DeviceUtils()

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, *args, **kwargs):
            fn()
            return 0.0

        return bench

    def get_device_interface(self):
        return torch.cpu


def apply() -> None:
    """Idempotent; a no-op when CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ninetoothed without CUDA needs TRITON_INTERPRET=1 set before triton is imported "
                           "(import difuse.fusion first)")
    import importlib

    # `triton.runtime.driver` the attribute is the DriverConfig object, not the module
    importlib.import_module("triton.runtime.driver").driver.set_active(_InterpreterDriver())
    jit = importlib.import_module("triton.runtime.jit")
    original = jit._normalize_ty

    def normalize(ty):
        if isinstance(ty, str) and ty.startswith("triton.language."):
            ty = "tl." + ty.removeprefix("triton.language.")
        return original(ty)

    jit._normalize_ty = normalize
    _APPLIED = True
