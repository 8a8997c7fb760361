"""KV-cache modes against the no-cache forward: a refresh equals the full forward, a step over a
fresh cache equals the full forward on its rows, writes happen in place at the step's rows
only, and left padding is invisible."""
import pytest
import torch

from difuse.runtime.config import GenerationConfig
from difuse.runtime.kv_cache import CachePolicy, StaticKVCache, key_padding_bias

PROMPT, GEN, BLOCK = 6, 16, 4


def sequence(model, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, PROMPT + GEN), generator=generator)
    tokens[:, PROMPT + 5:] = model.config.mask_token_id  # one decoded block and a bit, then masks
    positions = torch.arange(PROMPT + GEN).expand(batch, -1)
    return tokens, positions


def make_cache(model, batch):
    c = model.config
    return StaticKVCache(c.n_layers, batch, c.n_kv_heads, PROMPT + GEN, c.head_dim, torch.float32, "cpu")


def cached_forward(model, cache, tokens, positions, start, length, bias):
    rows = torch.arange(start, start + length)
    cache.bind(rows, bias)
    return model.forward(tokens[:, rows], positions[:, rows], cache=cache)


@pytest.mark.parametrize("mode", ["prefix", "dual", "vicinity"])
@pytest.mark.parametrize("block_start", [PROMPT, PROMPT + BLOCK, PROMPT + GEN - BLOCK])
def test_step_over_a_fresh_cache_equals_the_full_forward(tiny_model, mode, block_start):
    tokens, positions = sequence(tiny_model)
    bias = torch.zeros(2, 1, 1, PROMPT + GEN)
    full = tiny_model.forward(tokens, positions)
    policy = CachePolicy(GenerationConfig(gen_length=GEN, block_length=BLOCK, cache=mode, prefix_look=3, after_look=2))
    cache = make_cache(tiny_model, 2)
    refresh = policy.step_kind(0, block_start, PROMPT + GEN)
    assert (refresh.name, refresh.start, refresh.length) == ("refresh", 0, PROMPT + GEN)
    hidden = cached_forward(tiny_model, cache, tokens, positions, refresh.start, refresh.length, bias)
    torch.testing.assert_close(hidden, full, rtol=1e-5, atol=1e-5)
    kind = policy.step_kind(1, block_start, PROMPT + GEN)
    assert kind.start <= block_start and block_start + BLOCK <= kind.start + kind.length
    expected_length = {"prefix": PROMPT + GEN - block_start, "dual": BLOCK, "vicinity": 3 + BLOCK + 2}[mode]
    assert kind.length == expected_length
    hidden = cached_forward(tiny_model, cache, tokens, positions, kind.start, kind.length, bias)
    torch.testing.assert_close(hidden, full[:, kind.start:kind.start + kind.length], rtol=1e-5, atol=1e-5)


def test_dual_step_writes_only_the_block_rows_in_place(tiny_model):
    tokens, positions = sequence(tiny_model)
    bias = torch.zeros(2, 1, 1, PROMPT + GEN)
    cache = make_cache(tiny_model, 2)
    cached_forward(tiny_model, cache, tokens, positions, 0, PROMPT + GEN, bias)
    before = [k.clone() for k in cache.keys]
    pointers = [k.data_ptr() for k in cache.keys]
    block_start = PROMPT + BLOCK
    tokens[:, block_start:block_start + 2] = 7  # commit two tokens of the block
    cached_forward(tiny_model, cache, tokens, positions, block_start, BLOCK, bias)
    for layer, keys in enumerate(cache.keys):
        assert keys.data_ptr() == pointers[layer]
        changed = (keys != before[layer]).any(dim=(0, 1, 3)).nonzero().flatten().tolist()
        assert set(changed) <= set(range(block_start, block_start + BLOCK)) and changed
    # the new block keys are what a full forward of the new tokens computes at layer 0 (its
    # inputs do not depend on other rows' keys); deeper layers see the stale rest (Fast-dLLM)
    fresh = make_cache(tiny_model, 2)
    cached_forward(tiny_model, fresh, tokens, positions, 0, PROMPT + GEN, bias)
    rows = slice(block_start, block_start + BLOCK)
    torch.testing.assert_close(cache.keys[0][:, :, rows], fresh.keys[0][:, :, rows])


def test_vicinity_window_is_clamped_inside_the_sequence():
    policy = CachePolicy(GenerationConfig(gen_length=16, block_length=4, cache="vicinity", prefix_look=8, after_look=8))
    kinds = [policy.step_kind(1, start, 22) for start in (6, 10, 14, 18)]
    assert [(k.start, k.length) for k in kinds] == [(0, 20), (2, 20), (2, 20), (2, 20)]
    assert CachePolicy(GenerationConfig(cache="dual", refresh_every=3)).is_refresh(3)


def test_left_padding_is_invisible(tiny_model):
    tokens, positions = sequence(tiny_model, batch=1)
    pad = 5
    padded = torch.cat([torch.full((1, pad), tiny_model.config.eos_token_id), tokens], dim=1)
    padded_positions = (torch.arange(pad + PROMPT + GEN) - pad).clamp(min=0).unsqueeze(0)
    bias = key_padding_bias(torch.tensor([pad]), pad + PROMPT + GEN, torch.float32)
    alone = tiny_model.forward(tokens, positions)
    with_padding = tiny_model.forward(padded, padded_positions, attention_bias=bias)
    torch.testing.assert_close(with_padding[:, pad:], alone, rtol=1e-5, atol=1e-5)


def test_update_without_bound_rows_is_refused(tiny_model):
    cache = make_cache(tiny_model, 1)
    with pytest.raises(ValueError, match="call bind"):
        cache.update(0, torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 16))
