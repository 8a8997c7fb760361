"""Configs built from the real checkpoints' config.json fields: derived sizes, parameter counts of
the full-size models (built on the meta device), and clear refusals of unsupported settings."""
import pytest
import torch

from difuse.models import (
    LLaDA2Config, LLaDA2Model, LLaDAConfig, LLaDAModel, LLaDAMoEConfig, LLaDAMoEModel, make_tiny_checkpoint,
)
from difuse.models.loader import CheckpointError, family_of

LLADA_8B = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464,
    "rope": True, "rope_theta": 500000.0, "rope_full_precision": True, "rms_norm_eps": 1e-5, "block_type": "llama",
    "activation_type": "silu", "layer_norm_type": "rms", "weight_tying": False, "max_sequence_length": 4096,
    "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "multi_query_attention": None,
}
LLADA_MOE_7B = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "vocab_size": 157184, "hidden_size": 2048,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "expert_intermediate_size": 1024, "dense_intermediate_size": 8192,
    "moe_layer_freq": [1] * 16, "rope_theta": 50000, "max_position_embeddings": 8192, "qk_layernorm": True,
    "partial_rotary_factor": 1, "norm_topk_prob": False, "tie_word_embeddings": False, "hidden_act": "silu",
}
LLADA2_MINI = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184, "hidden_size": 2048,
    "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 5120, "first_k_dense_replace": 1, "num_experts": 256, "num_experts_per_tok": 8,
    "num_shared_experts": 1, "moe_intermediate_size": 512, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
    "router_dtype": "fp32", "norm_topk_prob": True, "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False,
    "rms_norm_eps": 1e-6, "rope_theta": 600000, "partial_rotary_factor": 0.5, "tie_word_embeddings": False,
    "pad_token_id": 156892, "max_position_embeddings": 16384,
}


def parameter_count(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def test_llada_8b_config_and_size():
    config = LLaDAConfig.from_hf_config(LLADA_8B)
    assert (config.head_dim, config.n_kv_heads) == (128, 32)
    assert parameter_count(LLaDAModel, config) == 8_015_581_184  # the checkpoint's bf16 total_size / 2


def test_llada_moe_7b_config_and_size():
    config = LLaDAMoEConfig.from_hf_config(LLADA_MOE_7B)
    assert (config.head_dim, config.rotary_dim, config.moe_layers) == (128, 128, (True,) * 16)
    assert (config.mask_token_id, config.eos_token_id) == (156895, 156892)  # Ling tokenizer defaults
    assert 7.30e9 < parameter_count(LLaDAMoEModel, config) < 7.40e9  # 14.7 GB of bf16 safetensors


def test_llada2_mini_config_and_size():
    config = LLaDA2Config.from_hf_config(LLADA2_MINI)
    assert (config.head_dim, config.rotary_dim) == (128, 64)
    assert 16.2e9 < parameter_count(LLaDA2Model, config) < 16.4e9  # "16B total"


def test_uniform_cache_sizes():
    with torch.device("meta"):
        dense = LLaDAModel(LLaDAConfig.from_hf_config(LLADA_8B))
        mini = LLaDA2Model(LLaDA2Config.from_hf_config(LLADA2_MINI))
    assert (dense.num_layers, dense.num_kv_heads, dense.head_dim, dense.hidden_size, dense.vocab_size) == (
        32, 32, 128, 4096, 126464)
    assert (mini.num_layers, mini.num_kv_heads, mini.head_dim, mini.hidden_size, mini.vocab_size) == (
        20, 4, 128, 2048, 157184)
    assert mini.dtype == torch.float32


def test_family_dispatch():
    assert family_of(LLADA_8B).name == "llada"
    assert family_of(LLADA_MOE_7B).name == "llada_moe"  # same model_type "llada" as dense LLaDA
    assert family_of({k: v for k, v in LLADA_MOE_7B.items() if k != "architectures"}).name == "llada_moe"
    assert family_of(LLADA2_MINI).name == "llada2"
    with pytest.raises(CheckpointError, match="unsupported model"):
        family_of({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


@pytest.mark.parametrize("config_class, hf, change, message", [
    (LLaDAMoEConfig, LLADA_MOE_7B, {"moe_layer_freq": [1] * 15}, "15 entries for 16 layers"),
    (LLaDAMoEConfig, LLADA_MOE_7B, {"moe_router_score_function": "sigmoid"}, "moe_router_score_function"),
    (LLaDAMoEConfig, LLADA_MOE_7B, {"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    (LLaDAMoEConfig, LLADA_MOE_7B, {"num_experts": None}, r"lacks required fields \['num_experts'\]"),
    (LLaDA2Config, LLADA2_MINI, {"n_group": 3}, "n_group 3"),
    (LLaDA2Config, LLADA2_MINI, {"use_qkv_bias": True}, "use_qkv_bias=True"),
    (LLaDA2Config, LLADA2_MINI, {"partial_rotary_factor": 0.305}, "rotary dim 39"),
    (LLaDA2Config, LLADA2_MINI, {"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    (LLaDA2Config, LLADA2_MINI, {"num_experts_per_tok": 200}, r"not in \[1, 128\]"),
])
def test_unsupported_settings_are_refused(config_class, hf, change, message):
    with pytest.raises(ValueError, match=message):
        config_class.from_hf_config(hf | change)


def test_tiny_maker_layer_override(tmp_path):
    from difuse.models import load_model

    model = load_model(make_tiny_checkpoint(tmp_path, kind="llada_moe", num_hidden_layers=3), dtype=torch.float32)
    assert model.num_layers == 3 and model.config.moe_layers == (True, True, True)


def test_tiny_maker_rejects_unknown_overrides(tmp_path):
    with pytest.raises(ValueError, match="n_layer"):
        make_tiny_checkpoint(tmp_path, kind="llada", n_layer=3)
    with pytest.raises(ValueError, match="unknown kind"):
        make_tiny_checkpoint(tmp_path, kind="dream")
