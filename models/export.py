"""Write a model we hold in memory as a checkpoint in its family's real HF format (config.json
with the original field names, safetensors with the original tensor names), so that it loads
through exactly the code path of any downloaded checkpoint."""
import json
from pathlib import Path

import torch

from difuse.models.llada import LLaDAConfig, LLaDAModel, checkpoint_map
from difuse.models.packing import Cat, Source
from difuse.models.tiny import _llada_config, _write_weights


def disassemble(source: Source, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of packing.assemble: checkpoint key -> tensor, split out of a packed parameter."""
    if isinstance(source, str):
        return {source: tensor}
    pieces = tensor.split(list(source.sizes)) if isinstance(source, Cat) else tensor.unbind(0)
    out = {}
    for part, piece in zip(source.parts, pieces):
        out.update(disassemble(part, piece))
    return out


def llada_hf_config(config: LLaDAConfig, dtype: torch.dtype) -> dict:
    """config.json of a dense LLaDA checkpoint (GSAI-ML/LLaDA-8B-Instruct field names): the tiny
    checkpoint maker's field set, with this model's sizes and token ids."""
    sizes = {name: getattr(config, name) for name in (
        "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio", "vocab_size",
        "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps")}
    pad = config.eos_token_id if config.pad_token_id is None else config.pad_token_id
    return _llada_config({"mask": config.mask_token_id, "eos": config.eos_token_id}) | sizes | {
        "pad_token_id": pad, "torch_dtype": str(dtype).removeprefix("torch.")}


def save_llada_checkpoint(model: LLaDAModel, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                          shards: int = 1) -> Path:
    """Write `model`'s config.json and weights (cast to `dtype`) into `path`; tokenizer files are
    the caller's (they belong to how the model was trained)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    weights = {}
    for name, source in checkpoint_map(model.config, set()).items():
        for key, tensor in disassemble(source, state[name]).items():
            weights[key] = tensor.detach().to("cpu", dtype).contiguous()
    (path / "config.json").write_text(json.dumps(llada_hf_config(model.config, dtype), indent=2) + "\n")
    _write_weights(path, weights, shards)
    return path
