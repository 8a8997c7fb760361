"""The built-in model: a small LLaDA trained by bench/train_tiny.py, shipped in models/builtin/,
and the generation settings a checkpoint folder recommends (generation_config.json)."""
import json
from pathlib import Path

from difuse.models.loader import family_of, read_config

BUILTIN_FOLDER = Path(__file__).resolve().parent / "builtin"

# The generation_config.json keys that map onto difuse's GenerationConfig fields.
GENERATION_KEYS = ("gen_length", "block_length", "steps")


def default_model_path() -> Path:
    """models/builtin/: the checkpoint used when no model is named. It loads like any LLaDA checkpoint."""
    if not (BUILTIN_FOLDER / "model.safetensors").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {BUILTIN_FOLDER}: reinstall difuse, "
                                "or name a checkpoint folder")
    return BUILTIN_FOLDER


def generation_defaults(path: str | Path) -> dict[str, int | str]:
    """What a checkpoint was trained for, to use where the user did not choose: gen_length /
    block_length / steps from `path`/generation_config.json, and iteration='block_diffusion' when
    config.json names a block-causal family (LLaDA2: its attention only ever saw that grid)."""
    defaults: dict[str, int | str] = {}
    if (Path(path) / "config.json").is_file() and family_of(read_config(path)).model_class.BLOCK_CAUSAL:
        defaults["iteration"] = "block_diffusion"
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return defaults
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from e
    return defaults | {key: settings[key] for key in GENERATION_KEYS if isinstance(settings.get(key), int)}
