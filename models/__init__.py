"""difuse.models: model families (LLaDA), configs built from HF config.json, strict checkpoint
loading, tokenizers, and tiny real-format checkpoints for tests and demos."""
from difuse.models.default import default_model_path, generation_defaults
from difuse.models.export import save_llada_checkpoint
from difuse.models.llada import LLaDAConfig, LLaDAModel
from difuse.models.loader import CheckpointError, load_model, read_config
from difuse.models.tiny import make_tiny_checkpoint
from difuse.models.tokenizer import encode_prompt, load_tokenizer

__all__ = [
    "CheckpointError", "LLaDAConfig", "LLaDAModel", "encode_prompt", "load_model", "load_tokenizer",
    "make_tiny_checkpoint", "read_config", "default_model_path", "generation_defaults", "save_llada_checkpoint",
]
