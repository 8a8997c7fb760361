import os

import torch

# Without a GPU, Triton kernels run under the interpreter: set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[False, True], ids=["weight-after-sum", "weight-first"])
def norm_weight_first(request, monkeypatch):
    """Both orders of the RMSNorm kernel's weight load (patterns.rms_norm.WEIGHT_FIRST)."""
    from difuse.patterns import _rows, rms_norm

    monkeypatch.setattr(rms_norm, "WEIGHT_FIRST", request.param)
    monkeypatch.setattr(rms_norm, "_PLANS", _rows.PlanCache())
    return request.param


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny dense LLaDA checkpoint in the real HF format, written once per session."""
    from difuse.models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llada"), kind="llada")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from difuse.models import load_model

    return load_model(tiny_path, "cpu", torch.float32)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
