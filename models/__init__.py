"""difuse.models: model families (dense LLaDA, LLaDA-MoE, LLaDA2), configs built from HF
config.json, strict checkpoint loading, tokenizers, and tiny real-format checkpoints."""
from difuse.models.llada import LLaDAConfig, LLaDAModel
from difuse.models.llada2 import LLaDA2Config, LLaDA2Model, block_causal_bias
from difuse.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from difuse.models.loader import CheckpointError, load_model, read_config
from difuse.models.moe import set_moe_dispatch, sigmoid_group_topk_router, softmax_topk_router
from difuse.models.parallel import ParallelConfig
from difuse.models.tiny import make_tiny_checkpoint
from difuse.models.tokenizer import encode_prompt, load_tokenizer

__all__ = [
    "CheckpointError", "LLaDA2Config", "LLaDA2Model", "LLaDAConfig", "LLaDAModel", "LLaDAMoEConfig",
    "LLaDAMoEModel", "ParallelConfig", "block_causal_bias", "encode_prompt", "load_model", "load_tokenizer", "make_tiny_checkpoint",
    "read_config", "set_moe_dispatch", "sigmoid_group_topk_router", "softmax_topk_router",
]
