"""Shared helpers of the runtime tests: a tiny real-format checkpoint and a host-sync detector."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from difuse.models import load_model, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llada"), kind="llada")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    return load_model(tiny_path, "cpu", torch.float32)


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value back to the host or has a data-dependent shape:
    the things that would break CUDA-graph capture of a step."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync inside a step: {func}")
        return func(*args, **(kwargs or {}))
