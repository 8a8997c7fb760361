"""Load HF-format checkpoints (config.json + safetensors, single file or sharded) into our models.

Loading is strict and all-or-nothing: the model is built on the meta device, every checkpoint
header is read and checked against the family's name map (every tensor used, every parameter
filled, every shape right) before any weight is read, and only then are tensors read from the
memory-mapped files, packed (QKV, gate-up, expert stacks), cast and moved to the device.
With a ParallelConfig, the checked model is sharded (difuse.models.parallel) and each rank reads
only its slices of the checkpoint tensors.
"""
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from difuse.models.llada import LLaDAConfig, LLaDAModel, checkpoint_map as llada_map
from difuse.models.llada2 import LLaDA2Config, LLaDA2Model, checkpoint_map as llada2_map
from difuse.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel, checkpoint_map as llada_moe_map
from difuse.models.packing import Shard, assemble, expected_shapes
from difuse.models.parallel import ParallelConfig, shard_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded exactly (missing, extra, mis-shaped or unreadable)."""


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_class: type
    checkpoint_map: Callable  # (config, checkpoint keys) -> {parameter name: Source}


FAMILIES = {
    "llada": Family("llada", LLaDAConfig, LLaDAModel, llada_map),
    "llada_moe": Family("llada_moe", LLaDAMoEConfig, LLaDAMoEModel, llada_moe_map),
    "llada2": Family("llada2", LLaDA2Config, LLaDA2Model, llada2_map),
}
ARCHITECTURES = {
    "LLaDAModelLM": "llada",
    "LLaDAMoEModelLM": "llada_moe", "LLaDAMoEModel": "llada_moe", "FusedLLaDAMoEModelLM": "llada_moe",
    "LLaDA2MoeModelLM": "llada2",
}
# LLaDA-MoE's own config also says model_type "llada"; the architectures entry tells them apart.
MODEL_TYPES = {"llada": "llada", "lladamoe": "llada_moe", "llada_moe": "llada_moe", "llada2_moe": "llada2"}


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON ({e})") from e


def family_of(hf_config: dict) -> Family:
    for arch in hf_config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return FAMILIES[ARCHITECTURES[arch]]
    model_type = hf_config.get("model_type")
    if model_type == "llada" and "num_experts" in hf_config:
        return FAMILIES["llada_moe"]
    if model_type in MODEL_TYPES:
        return FAMILIES[MODEL_TYPES[model_type]]
    raise CheckpointError(
        f"unsupported model: architectures={hf_config.get('architectures')}, model_type={model_type!r}; "
        f"supported architectures: {sorted(ARCHITECTURES)}"
    )


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from the shard index or the single file."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({e})") from e
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with _open(path / SINGLE_FILE) as f:
            return {key: path / SINGLE_FILE for key in f.keys()}
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}")


def _open(file: Path):
    if not file.is_file():
        raise CheckpointError(f"{file}: missing checkpoint file")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _headers(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shape of every checkpoint tensor, checking that each shard holds what the index says and
    that every tensor is floating point (quantised checkpoints are not supported)."""
    shapes = {}
    for file in sorted(set(files.values())):
        with _open(file) as f:
            held = set(f.keys())
            listed = {key for key, where in files.items() if where == file}
            if listed - held:
                raise CheckpointError(f"{file}: lacks tensors the index assigns to it: {sorted(listed - held)[:10]}")
            for key in sorted(listed):
                tensor = f.get_slice(key)
                if tensor.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {key} has dtype {tensor.get_dtype()}, not floating point")
                shapes[key] = tuple(tensor.get_shape())
    return shapes


def _check(sources: dict, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path) -> None:
    params = dict(model.named_parameters())
    problems = []
    if set(sources) != set(params):
        raise AssertionError(f"name map and model disagree: {sorted(set(sources) ^ set(params))}")
    wanted = {}
    for name, source in sources.items():
        wanted.update(expected_shapes(source, tuple(params[name].shape)))
    missing = sorted(set(wanted) - set(shapes))
    unexpected = sorted(set(shapes) - set(wanted))
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_few(unexpected)}")
    misshaped = [f"{key} {shapes[key]} (expected {wanted[key]})"
                 for key in sorted(set(wanted) & set(shapes)) if shapes[key] != wanted[key]]
    if misshaped:
        problems.append(f"mis-shaped tensors: {_few(misshaped)}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))


def _float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return resolved


def _few(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16,
               parallel: ParallelConfig | None = None):
    """Build the model described by `path`/config.json and fill it from its safetensors files,
    with parameters in `dtype` (a torch dtype or its name, e.g. "bfloat16") on `device`.
    With `parallel`, this rank's shard of the model (every rank of the group must call this)."""
    dtype = _float_dtype(dtype)
    hf_config = read_config(path)
    family = family_of(hf_config)
    try:
        config = family.config_class.from_hf_config(hf_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e
    files = checkpoint_files(path)
    shapes = _headers(files)
    sources = family.checkpoint_map(config, set(shapes))
    with torch.device("meta"):
        model = family.model_class(config)
    _check(sources, model, shapes, path)
    shards = shard_model(model, parallel) if parallel is not None else {}

    state = {}
    with ExitStack() as stack:
        handles = {file: stack.enter_context(_open(file)) for file in set(files.values())}

        def read(key: str, shard: Shard | None) -> torch.Tensor:
            if shard is None:
                return handles[files[key]].get_tensor(key)
            tensor = handles[files[key]].get_slice(key)
            lead = (slice(None),) * shard.dim
            return torch.cat([tensor[(*lead, slice(start, stop))] for start, stop in shard.ranges], dim=shard.dim)

        for name, source in sources.items():
            target = torch.float32 if name.endswith(model.FP32_PARAMETERS) else dtype
            state[name] = assemble(source, read, shards.get(name)).to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
