"""Dense LLaDA against an independent reference forward written from the math with the HF weight
names, plus the KV-cache contract (cache.update) and the input checks."""
import json

import pytest
import torch
from safetensors.torch import load_file

from difuse.models import LLaDAConfig, load_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llada"), kind="llada", seed=1, n_kv_heads=2)


def reference_logits(path, input_ids, positions):
    """LLaDA forward straight from the HF tensors in fp32: pre-norm blocks, rotate-half RoPE,
    bidirectional softmax attention, SwiGLU with ff_proj as the gate, untied head ff_out."""
    cfg = json.loads((path / "config.json").read_text())
    W = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    H, Hkv, eps = cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"]
    D = cfg["d_model"] // H
    B, T = input_ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, D]

    def rope(x):  # x: [B, heads, T, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * angles.cos() + rotated * angles.sin()

    def heads(x, n):
        return x.view(B, T, n, D).transpose(1, 2)

    x = W["model.transformer.wte.weight"][input_ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        n = rms(x, W[p + "attn_norm.weight"])
        q = rope(heads(n @ W[p + "q_proj.weight"].T, H))
        k = rope(heads(n @ W[p + "k_proj.weight"].T, Hkv)).repeat_interleave(H // Hkv, dim=1)
        v = heads(n @ W[p + "v_proj.weight"].T, Hkv).repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / D**0.5
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + out @ W[p + "attn_out.weight"].T
        n = rms(x, W[p + "ff_norm.weight"])
        gate, up = n @ W[p + "ff_proj.weight"].T, n @ W[p + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ W[p + "ff_out.weight"].T
    return rms(x, W["model.transformer.ln_f.weight"]) @ W["model.transformer.ff_out.weight"].T


@pytest.mark.gpu
def test_matches_reference_fp32(checkpoint, device):
    model = load_model(checkpoint, device, torch.float32)
    input_ids = torch.randint(0, 320, (2, 11))
    positions = torch.arange(11).expand(2, 11) + torch.tensor([[0], [5]])  # row 1 starts at 5
    logits = model.compute_logits(model(input_ids.to(device), positions.to(device))).cpu()
    expected = reference_logits(checkpoint, input_ids, positions)
    assert logits.shape == (2, 11, 320) and logits.dtype == torch.float32
    tolerance = 2e-4 if device == "cpu" else 2e-3
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)


def test_bf16_close_to_fp32_reference(checkpoint):
    model = load_model(checkpoint, "cpu", torch.bfloat16)
    input_ids = torch.randint(0, 320, (1, 16))
    positions = torch.arange(16)[None]
    logits = model.compute_logits(model(input_ids, positions))
    expected = reference_logits(checkpoint, input_ids, positions)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() < 0.1 * expected.abs().max()
    assert (logits.float().argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


class WindowCache:
    """Static max-length K/V buffers written in place; each forward covers the window
    [start, start + T) and attends over all `valid` positions through an additive bias."""

    def __init__(self, config: LLaDAConfig, batch: int, max_len: int, valid: int):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.randn(shape) for _ in range(config.n_layers)]  # garbage beyond `valid`
        self.v = [torch.randn(shape) for _ in range(config.n_layers)]
        invalid = torch.arange(max_len) >= valid
        self.bias = torch.zeros(1, 1, 1, max_len).masked_fill(invalid, float("-inf"))  # [B, Hq, T, S]
        self.start = 0

    def update(self, layer, k, v):
        window = slice(self.start, self.start + k.shape[2])
        self.k[layer][:, :, window] = k
        self.v[layer][:, :, window] = v
        return self.k[layer], self.v[layer], self.bias


def test_cached_block_forward_equals_full_forward(checkpoint):
    model = load_model(checkpoint, "cpu", torch.float32)
    T = 12
    input_ids = torch.randint(0, 320, (2, T))
    positions = torch.arange(T).expand(2, T)
    full = model(input_ids, positions)

    cache = WindowCache(model.config, batch=2, max_len=T + 5, valid=T)
    torch.testing.assert_close(model(input_ids, positions, cache=cache), full, atol=1e-5, rtol=1e-5)
    cache.start = 4  # recompute one block against the cached keys/values of the rest
    block = model(input_ids[:, 4:8], positions[:, 4:8], cache=cache)
    torch.testing.assert_close(block, full[:, 4:8], atol=1e-5, rtol=1e-5)


def test_attention_bias_masks_keys(checkpoint):
    model = load_model(checkpoint, "cpu", torch.float32)
    input_ids = torch.randint(0, 320, (1, 9))
    positions = torch.arange(9)[None]
    bias = torch.zeros(9, 9)
    bias[:, 6:] = float("-inf")  # nobody sees the last three tokens
    masked = model(input_ids, positions, attention_bias=bias)
    prefix_only = model(input_ids[:, :6], positions[:, :6])
    torch.testing.assert_close(masked[:, :6], prefix_only, atol=1e-5, rtol=1e-5)


def test_bool_attention_mask_equals_additive_bias(checkpoint):
    model = load_model(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., :3] = False  # row 0: its first three keys are padding
    additive = torch.zeros(2, 1, 1, 7).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        from_bool = model(ids, positions, attention_bias=keep)
        from_float = model(ids, positions, attention_bias=additive)
        unmasked = model(ids, positions)
    torch.testing.assert_close(from_bool, from_float)
    assert not torch.allclose(from_bool[0], unmasked[0])


def test_inputs_embeds_and_argument_checks(checkpoint):
    model = load_model(checkpoint, "cpu", torch.float32)
    input_ids = torch.randint(0, 320, (1, 5))
    positions = torch.arange(5)[None]
    torch.testing.assert_close(model(None, positions, inputs_embeds=model.embed(input_ids)), model(input_ids, positions))
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids, positions, inputs_embeds=model.embed(input_ids))
    with pytest.raises(ValueError, match="through the cache"):
        model(input_ids, positions, cache=WindowCache(model.config, 1, 5, 5), attention_bias=torch.zeros(5, 5))


def test_config_from_real_llada_8b_fields():
    hf = {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
          "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5, "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
          "pad_token_id": 126081, "block_type": "llama", "activation_type": "silu", "multi_query_attention": None,
          "init_cutoff_factor": None}
    config = LLaDAConfig.from_hf_config(hf)
    assert (config.head_dim, config.mlp_hidden_size, config.n_kv_heads) == (128, 12288, 32)
    with pytest.raises(ValueError, match="block_type='sequential'"):
        LLaDAConfig.from_hf_config(hf | {"block_type": "sequential"})
    with pytest.raises(ValueError, match="mask_token_id"):
        LLaDAConfig.from_hf_config(hf | {"mask_token_id": 200000})
    with pytest.raises(ValueError, match=r"\['n_layers'\]"):
        LLaDAConfig.from_hf_config({k: v for k, v in hf.items() if k != "n_layers"})
