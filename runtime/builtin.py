"""The model used when none is named: the trained checkpoint shipped with difuse.models, or,
until that exists, a deterministic tiny random checkpoint made once in the user cache folder."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def builtin_model_path() -> str:
    import difuse.models as models

    shipped = models.default_model_path()  # None until models/builtin/ holds a checkpoint
    if shipped is not None:
        return str(shipped)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difuse" / "tiny-llada"
    if not (cache / "config.json").is_file():
        print(f"difuse: no built-in trained model yet; creating a tiny random LLaDA checkpoint in {cache} "
              "(its output is meaningless text)", file=sys.stderr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        scratch = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        models.make_tiny_checkpoint(str(scratch), kind="llada")
        try:
            scratch.replace(cache)  # atomic: a crash never leaves a half-written checkpoint behind
        except OSError:
            if not (cache / "config.json").is_file():
                raise
            shutil.rmtree(scratch)  # another process made it first
    else:
        print(f"difuse: no built-in trained model yet; using the tiny random checkpoint in {cache}", file=sys.stderr)
    return str(cache)
