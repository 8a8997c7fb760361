"""A host-sync detector for the runtime tests."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value back to the host or has a data-dependent shape:
    the things that would break CUDA-graph capture of a step."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync inside a step: {func}")
        return func(*args, **(kwargs or {}))
