"""Kernel cache: in memory and on disk, keyed by structure + dtypes + shape bucket + device + versions.

On disk every entry is `<cache_dir>/kernels/<key>.py` (the generated source, importable, also what
Triton's own binary cache keys on) plus `<key>.json` (metadata and profile decisions). Writes are
atomic (temporary file + os.replace), so concurrent processes never read half a file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("triton", "ninetoothed"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[name] = "absent"
    return versions


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


def cache_key(*parts: Any) -> str:
    blob = json.dumps([str(p) if not isinstance(p, (int, float, str, list, dict)) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class KernelCache:
    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir) / "kernels"
        self.memory: dict[str, Any] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0}

    def source_path(self, key: str) -> Path:
        return self.dir / f"{key}.py"

    def load_source(self, key: str) -> str | None:
        path = self.source_path(key)
        return path.read_text() if path.exists() else None

    def store_source(self, key: str, source: str) -> Path:
        path = self.source_path(key)
        if not path.exists() or path.read_text() != source:
            atomic_write(path, source)
        return path

    def import_module(self, key: str) -> ModuleType:
        """Import the stored source as a real module (Triton and ninetoothed read source files)."""
        name = f"difuse_kernel_{key}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, self.source_path(key))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module

    def read_meta(self, key: str) -> dict:
        path = self.dir / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_meta(self, key: str, meta: dict) -> None:
        atomic_write(self.dir / f"{key}.json", json.dumps(meta, indent=1, sort_keys=True, default=str))
