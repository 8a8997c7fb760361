import weakref

import pytest
import torch

from difuse.fusion import RecordingError, ScalarArg, record
from tiny_block import MASK_ID, TinyBlock, decode_step, rope_tables


def _step_inputs(t=6):
    h = torch.randn(1, t, 32)
    cos, sin = rope_tables(t)
    positions = torch.arange(3, 3 + t)
    tokens = torch.full((1, t), MASK_ID)
    tokens[0, 1] = 5
    return h, cos, sin, positions, tokens


def test_transformer_block_and_decode_step_in_one_graph():
    module = TinyBlock()
    step = decode_step(module)
    h, cos, sin, positions, tokens = _step_inputs()
    cache = module.k_cache

    eager_tokens, eager_cache = tokens.clone(), cache.clone()
    graph = record(step, h, cos, sin, positions, tokens, 1e-5, 0.02, MASK_ID)
    recorded_tokens, recorded_cache = tokens.clone(), cache.clone()
    # Recording ran the step once for real, like an eager call.
    cache.copy_(eager_cache)
    expected = step(h, cos, sin, positions, eager_tokens, 1e-5, 0.02, MASK_ID)
    assert torch.equal(recorded_tokens, eager_tokens) and torch.equal(recorded_cache, cache)

    ops = {n.op for n in graph.nodes}
    assert {"aten._softmax.default", "aten.max.dim", "aten.index_copy_.default", "aten.copy_.default"} <= ops
    assert graph.scalars == {5: float, 6: float, 7: int} and graph.specialized == {}
    assert any(isinstance(a, ScalarArg) and a.index == 6 for n in graph.nodes for a in n.args)
    assert any(c is cache for c in graph.constants.values()), "closed-over cache must be held by reference"
    assert any(c is module.wqkv for c in graph.constants.values())

    cache.copy_(eager_cache)
    replay_tokens = _step_inputs()[4]
    out = graph.execute(h, cos, sin, positions, replay_tokens, 1e-5, 0.02, MASK_ID)
    torch.testing.assert_close(out["hidden"], expected["hidden"], rtol=0, atol=0)
    assert torch.equal(out["accepted"], expected["accepted"])
    assert torch.equal(replay_tokens, eager_tokens), "in-place write into the block must replay"
    assert torch.equal(cache, recorded_cache), "in-place KV-cache write must hit the same buffer"


def test_runtime_scalars_change_results_without_rerecording():
    def fn(x, threshold: float, mask_id: int):
        return torch.where(x > threshold, x, torch.full_like(x, mask_id))

    x = torch.randn(4, 7)
    graph = record(fn, x, 0.1, 3)
    assert graph.scalars == {1: float, 2: int}
    for threshold, mask_id in [(0.5, 9), (-1.0, 0)]:
        assert torch.equal(graph.execute(x, threshold, mask_id), fn(x, threshold, mask_id))


def test_structural_and_transformed_scalars_are_specialised():
    def fn(x, temperature: float, n: int, scale: float):
        y = x / temperature if temperature > 0 else x  # steers control flow
        return y[:, :n] * (1.0 / scale)  # n changes a shape; scale is transformed before use

    graph = record(fn, torch.randn(3, 8), 0.7, 4, 2.0)
    assert graph.specialized == {1: 0.7, 2: 4, 3: 2.0} and graph.scalars == {}


def test_random_ops_stay_random():
    def fn(x):
        return x - torch.empty_like(x).exponential_().log()

    x = torch.zeros(64)
    graph = record(fn, x)
    a, b = graph.execute(x), graph.execute(x)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    c = graph.execute(x)
    torch.manual_seed(3)
    assert torch.equal(c, fn(x))


def test_host_sync_is_rejected_with_a_clear_error():
    def fn(x):
        return x * x.sum().item()

    with pytest.raises(RecordingError, match="on the device"):
        record(fn, torch.randn(3))
    with pytest.raises(RecordingError, match="on the device"):
        record(lambda x: x * 2 if torch.equal(x, x) else x, torch.randn(3))


def test_nested_tensor_arguments_are_rejected():
    with pytest.raises(TypeError, match="top-level positional"):
        record(lambda xs: xs[0] + 1, [torch.randn(2)])


def test_mutation_of_input_through_a_view_replays():
    def fn(buf, x):
        buf[:, 1:].add_(x)
        return buf.sum(-1)

    buf, x = torch.zeros(2, 4), torch.ones(2, 3)
    graph = record(fn, buf, x)
    buf.zero_()
    out = graph.execute(buf, x)
    assert torch.equal(buf, torch.tensor([[0.0, 1, 1, 1]] * 2)) and torch.equal(out, torch.full((2,), 3.0))
    assert any(n.mutates for n in graph.nodes)


def test_inference_mode_records_the_same_ops_as_no_grad():
    """Composite ops reach the recorder undecomposed under inference_mode; it decomposes them."""
    from difuse.patterns.confidence import threshold_select, token_confidence
    from difuse.patterns.rms_norm import rms_norm

    def step(x, w, block):
        confidence, token = token_confidence(rms_norm(x, w, 1e-6).to(torch.bfloat16))
        threshold_select(confidence, token, block, 3, 0.5)
        return confidence

    x, w = torch.randn(2, 4, 16), torch.randn(16)
    block = torch.full((2, 4), 3)
    with torch.no_grad():
        plain = [node.op for node in record(step, x, w, block.clone()).nodes]
    with torch.inference_mode():
        inference = [node.op for node in record(step, x, w, block.clone()).nodes]
    assert inference == plain
    assert "aten.to.dtype" not in inference and "aten._softmax.default" in inference


def test_recording_does_not_keep_intermediates_alive():
    """A step's activations are freed as the recorded function goes (as they are when it runs),
    and memory reused by a later tensor is not taken for the dead one's storage."""
    alive_during_recording = []

    def step(x):
        earlier = []
        for _ in range(4):
            t = x * 2.0
            earlier.append(weakref.ref(t))
            x = t + 1.0
        del t
        alive_during_recording.append(sum(ref() is not None for ref in earlier))
        return x

    graph = record(step, torch.randn(256, 256))
    assert alive_during_recording and not any(alive_during_recording)
    storages = [graph.meta[node.outputs[0]].storage for node in graph.nodes]
    assert len(set(storages)) == len(storages)  # no op's output aliases another's
