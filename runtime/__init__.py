"""difuse.runtime: the block-diffusion runtime (Engine, GenerationConfig, decoders, KV caches,
iteration management, step capture) and the `difuse` command line."""
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine, Result

__all__ = ["Engine", "GenerationConfig", "Result"]
