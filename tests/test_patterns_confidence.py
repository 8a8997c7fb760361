import pytest
import torch
from pattern_checks import DTYPES, graph_values, resolve_params

from difuse.fusion.record import record
from difuse.patterns import confidence
from difuse.patterns.confidence_patterns import (
    ConfidenceThresholdSelectPattern,
    ConfidenceTopKSelectPattern,
    SampledTokenConfidencePattern,
    ThresholdSelectPattern,
    TokenConfidencePattern,
    TopKSelectPattern,
)
from difuse.patterns.confidence import (
    choose_splits,
    confidence_select_bytes,
    confidence_threshold_select,
    confidence_topk_select,
    fused_threshold_select,
    fused_token_confidence,
    fused_topk_select,
    threshold_select,
    token_confidence,
    token_confidence_bytes,
    topk_select,
)

MASK_ID = 999
# (splits, block_v): one pass over the row, and three splits of three 128-wide tiles each
VARIANTS = [(1, None), (3, 128)]


def untied_logits(shape, device, dtype, scale=3.0):
    """Random logits whose row maximum is unique even after rounding to `dtype`."""
    logits = torch.randn(shape, device=device) * scale
    flat = logits.view(-1, shape[-1])
    winner = torch.randint(0, shape[-1], (flat.shape[0],), device=device)
    flat[torch.arange(flat.shape[0], device=device), winner] = flat.amax(-1) + 1.0
    return logits.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,block_v", VARIANTS)
def test_token_confidence_matches_reference(device, dtype, splits, block_v):
    logits = untied_logits((6, 1000), device, dtype)
    conf, token = fused_token_confidence(logits, splits=splits, block_v=block_v)
    ref_conf, ref_token = token_confidence(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("splits,block_v", VARIANTS)
def test_token_confidence_odd_shapes_and_strides(device, splits, block_v):
    wide = untied_logits((2, 3, 1200), device, torch.bfloat16)
    logits = wide[..., :1000]  # rows 1200 apart, vocabulary 1000
    ref_conf, ref_token = token_confidence(logits)
    conf, token = fused_token_confidence(logits, splits=splits, block_v=block_v)
    assert conf.shape == token.shape == (2, 3)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, atol=1e-6, rtol=1e-5)
    small = untied_logits((5, 123), device, torch.float16)
    conf, token = fused_token_confidence(small, splits=splits, block_v=32 if block_v else None)
    assert torch.equal(token, token_confidence(small)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("splits,block_v", VARIANTS)
def test_token_confidence_ties_take_the_smallest_index(device, splits, block_v):
    logits = torch.zeros(3, 1000, device=device)
    logits[1, [700, 5, 300]] = 2.0  # equal maxima in different tiles and splits
    logits[2, [999, 640]] = 1.0
    conf, token = fused_token_confidence(logits, splits=splits, block_v=block_v)
    ref_conf, ref_token = token_confidence(logits)
    assert token.tolist() == [0, 5, 640] == ref_token.tolist()
    torch.testing.assert_close(conf, ref_conf)


@pytest.mark.gpu
def test_ties_in_one_lane_take_the_smallest_index(device):
    """A lane's tied maxima in one tile's rows and in later tiles: the column found after the pass
    is the first one, wherever the lane first reached its max."""
    block_v = 128
    width = block_v // min(confidence.TILE_ROWS, block_v)  # the lanes of a tile row
    lane = 5
    tied = [
        [lane + 2 * block_v + width, lane + block_v, lane + (block_v // width - 1) * width],  # last row of tile 0
        [lane + block_v + width, lane + block_v],  # two rows of tile 1
        [lane + 3 * block_v, lane + block_v],  # tiles 1 and 3
    ]
    logits = torch.zeros(3, 1000, device=device)
    for row, columns in enumerate(tied):
        logits[row, columns] = 2.0
    logits[2, lane] = 1.0  # the lane's max rises after tile 0
    conf, token = fused_token_confidence(logits, splits=1, block_v=block_v)
    ref_conf, ref_token = token_confidence(logits)
    assert token.tolist() == ref_token.tolist() == [min(columns) for columns in tied]
    torch.testing.assert_close(conf, ref_conf)


@pytest.mark.gpu
def test_token_confidence_with_masked_vocabulary(device):
    logits = torch.randn(4, 1000, device=device)
    logits[:, 500:] = float("-inf")  # e.g. a padded vocabulary
    logits[0, :300] = float("-inf")
    for splits, block_v in VARIANTS:
        conf, token = fused_token_confidence(logits, splits=splits, block_v=block_v)
        ref_conf, ref_token = token_confidence(logits)
        assert torch.equal(token, ref_token)
        torch.testing.assert_close(conf, ref_conf)


@pytest.mark.gpu
def test_sampling_follows_the_tempered_softmax(device):
    logits = torch.tensor([0.5, -1.0, 2.0, 1.0], device=device)
    rows = logits.expand(300, 4).contiguous()  # 300 independent draws (the interpreter is slow)
    for temperature in (0.7,):
        conf, token = fused_token_confidence(rows, temperature=temperature, seed=7)
        frequency = torch.bincount(token, minlength=4).float() / len(token)
        expected = torch.softmax(logits / temperature, dim=-1)
        assert (frequency - expected).abs().max() < 0.08, (frequency, expected)
        # the confidence is the untempered probability of the drawn token
        torch.testing.assert_close(conf, torch.softmax(logits, -1)[token])


@pytest.mark.gpu
@pytest.mark.parametrize("splits,block_v", VARIANTS)
def test_sampling_is_seeded_and_split_independent(device, splits, block_v):
    logits = torch.randn(6, 1000, device=device)
    _, token = fused_token_confidence(logits, temperature=1.0, seed=11, splits=splits, block_v=block_v)
    _, one_pass = fused_token_confidence(logits, temperature=1.0, seed=11, splits=1)
    _, from_tensor = fused_token_confidence(logits, temperature=1.0, seed=torch.tensor(11, device=device))
    _, other_seed = fused_token_confidence(logits, temperature=1.0, seed=12, splits=splits, block_v=block_v)
    assert torch.equal(token, one_pass) and torch.equal(token, from_tensor)
    assert not torch.equal(token, other_seed)


@pytest.mark.gpu
def test_sampling_near_zero_temperature_is_greedy(device):
    logits = untied_logits((6, 1000), device, torch.float32)
    _, token = fused_token_confidence(logits, temperature=1e-4, seed=3)
    assert torch.equal(token, logits.argmax(-1))


def selection_case(device, dtype, batch=3, n=7, vocab=1000):
    logits = untied_logits((batch, n, vocab), device, dtype)
    block = torch.randint(0, 50, (batch, n), device=device)
    block[torch.rand(batch, n, device=device) < 0.6] = MASK_ID
    block[0, 2] = MASK_ID
    block[-1] = 5  # a row with nothing left to decode
    return logits, block


def safe_threshold(confidence: torch.Tensor, wanted: float) -> float:
    """A threshold at least 1e-4 away from every confidence (ties at the threshold are excluded)."""
    threshold = wanted
    while (confidence - threshold).abs().min() < 1e-4:
        threshold += 3e-4
    return threshold


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,block_v", VARIANTS)
@pytest.mark.parametrize("wanted", [0.0, 0.3, 1.01])  # everything / some / only the top-1
def test_confidence_threshold_select_matches_reference(device, dtype, splits, block_v, wanted):
    logits, block = selection_case(device, dtype)
    conf, token = token_confidence(logits)
    threshold = safe_threshold(conf, wanted)
    ref_block = block.clone()
    ref_accept = threshold_select(conf, token, ref_block, MASK_ID, threshold)
    for given in (threshold, torch.tensor(threshold, device=device)):
        fused_block = block.clone()
        accept = confidence_threshold_select(logits, fused_block, MASK_ID, given, splits=splits, block_v=block_v)
        assert torch.equal(accept, ref_accept)
        assert torch.equal(fused_block, ref_block)
    assert ref_accept[:-1].any(dim=-1).all()  # the top-1 of every row with masks is always taken


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,block_v", VARIANTS)
def test_confidence_topk_select_matches_reference(device, dtype, splits, block_v):
    logits, block = selection_case(device, dtype)
    conf, token = token_confidence(logits)
    for k in (torch.tensor([2, 0, 3], device=device), torch.tensor([7, 1, 1], device=device)):
        ref_block = block.clone()
        ref_accept = topk_select(conf, token, ref_block, MASK_ID, k)
        fused_block = block.clone()
        accept = confidence_topk_select(logits.view(-1, logits.shape[-1]), fused_block, MASK_ID, k,
                                        splits=splits, block_v=block_v)
        assert torch.equal(accept, ref_accept)
        assert torch.equal(fused_block, ref_block)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_confidence_topk_select_accepts_exactly_k_per_row(device, temperature):
    """Many rows folded from split partials: each row accepts min(k, masked) positions. On an H100 a
    position once ranked behind its own second copy, so rows accepted fewer than k."""
    torch.manual_seed(3)
    batch, n = 6, 16
    logits = torch.randn(batch, n, 300, device=device)
    block = torch.full((batch, n), MASK_ID, device=device)
    block[torch.rand(batch, n, device=device) < 0.3] = 4
    k = torch.randint(0, n + 2, (batch,), device=device)
    masked = (block == MASK_ID).sum(-1)
    fused_block = block.clone()
    accept = confidence_topk_select(logits, fused_block, MASK_ID, k, temperature, seed=7, splits=3, block_v=64)
    assert torch.equal(accept.sum(-1), torch.minimum(k, masked))
    if temperature == 0.0:
        conf, token = token_confidence(logits)
        ref_block = block.clone()
        assert torch.equal(accept, topk_select(conf, token, ref_block, MASK_ID, k))
        assert torch.equal(fused_block, ref_block)


@pytest.mark.gpu
def test_selection_writes_into_a_strided_int32_block(device):
    logits, block = selection_case(device, torch.float32)
    conf, token = token_confidence(logits)
    storage = torch.zeros(3, 14, dtype=torch.int32, device=device)
    strided = storage[:, ::2]
    strided.copy_(block)
    ref_block = block.clone()
    ref_accept = threshold_select(conf, token, ref_block, MASK_ID, 0.5)
    accept = confidence_threshold_select(logits, strided, MASK_ID, 0.5)
    assert torch.equal(accept, ref_accept)
    assert torch.equal(strided.long(), ref_block)
    assert not storage[:, 1::2].any()


@pytest.mark.gpu
def test_standalone_selection_kernels_with_tied_confidences(device):
    block = torch.full((2, 9), MASK_ID, device=device)
    block[0, 3] = 4
    conf = torch.tensor([[0.2, 0.5, 0.5, 0.9, 0.5, 0.1, 0.7, 0.7, 0.3],
                         [0.4] * 9], device=device)
    token = torch.arange(18, device=device).view(2, 9)
    for k in (torch.tensor([3, 4], device=device), 2):
        k_tensor = k if isinstance(k, torch.Tensor) else torch.full((2,), k, device=device)
        ref_block, fused_block = block.clone(), block.clone()
        ref_accept = topk_select(conf, token, ref_block, MASK_ID, k_tensor)
        assert torch.equal(fused_topk_select(conf, token, fused_block, MASK_ID, k), ref_accept)
        assert torch.equal(fused_block, ref_block)
    ref_block, fused_block = block.clone(), block.clone()
    ref_accept = threshold_select(conf, token, ref_block, MASK_ID, 0.6)
    assert torch.equal(fused_threshold_select(conf, token, fused_block, MASK_ID, 0.6), ref_accept)
    assert torch.equal(fused_block, ref_block)


def test_selection_rejects_bad_input(device):
    logits = torch.randn(2, 4, 50, device=device)
    block = torch.full((2, 4), MASK_ID, device=device)
    with pytest.raises(ValueError, match=r"\[B, N, V\] or \[B\*N, V\]"):
        confidence_threshold_select(logits, block[:, :3], MASK_ID, 0.5)
    with pytest.raises(TypeError, match="block must be"):
        confidence_threshold_select(logits, block.float(), MASK_ID, 0.5)
    with pytest.raises(TypeError, match="mask_id"):
        confidence_threshold_select(logits, block, 1.5, 0.5)
    with pytest.raises(ValueError, match="0-dim float tensor"):
        confidence_threshold_select(logits, block, MASK_ID, torch.tensor([0.5], device=device))
    with pytest.raises(ValueError, match=r"k must be"):
        confidence_topk_select(logits, block, MASK_ID, torch.tensor([1], device=device))
    with pytest.raises(ValueError, match="temperature"):
        fused_token_confidence(logits, temperature=-1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fused_token_confidence(logits.long())
    wide = torch.full((1, 300), MASK_ID, device=device)
    with pytest.raises(ValueError, match="at most 256"):
        fused_topk_select(torch.rand(1, 300, device=device), wide.clone(), wide, MASK_ID, 3)


def test_split_choice_and_bytes():
    cpu = torch.device("cpu")
    assert choose_splits(32, 126464, cpu) > 8  # few rows: split the vocabulary over the SMs
    assert choose_splits(4096, 126464, cpu) == 1
    assert choose_splits(32, 1000, cpu) == 1  # too short to split
    logits = torch.empty(2, 4, 100, dtype=torch.bfloat16)
    assert token_confidence_bytes(logits) == 800 * 2 + 8 * 12
    assert confidence_select_bytes(logits, torch.empty(2, 4, dtype=torch.int64)) == 800 * 2 + 8 * 17


# ---- matchers -------------------------------------------------------------------------------

def decode_step(logits, block, mask_id, threshold):
    confidence, token = token_confidence(logits)
    return threshold_select(confidence, token, block, mask_id, threshold)


def decode_step_topk(logits, block, mask_id, k):
    confidence, token = token_confidence(logits)
    return topk_select(confidence, token, block, mask_id, k)


def decode_step_keeping_confidence(logits, block, mask_id, threshold):
    confidence, token = token_confidence(logits)
    return threshold_select(confidence, token, block, mask_id, threshold), confidence


def run_selection_match(pattern, fn, logits, block, *rest):
    graph = record(fn, logits, block.clone(), *rest)
    matches = pattern.match(graph)
    assert len(matches) == 1, matches
    match = matches[0]
    args = (logits, block.clone(), *rest)
    expected_accept = graph.execute(*args)
    expected_block = args[1]
    args = (logits, block.clone(), *rest)
    env = {name: args[pos] for name, pos in graph.inputs.items()}
    accept, written = pattern.kernel(*[env[n] for n in match.inputs], **resolve_params(match.params, args))
    assert torch.equal(accept, expected_accept if isinstance(expected_accept, torch.Tensor) else expected_accept[0])
    assert written is args[1] and torch.equal(written, expected_block)
    return graph, match


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_threshold_select_matcher(device, dtype):
    logits, block = selection_case(device, dtype, vocab=200)
    for threshold in (0.3, torch.tensor(0.3, device=device)):
        graph, match = run_selection_match(ConfidenceThresholdSelectPattern(), decode_step, logits, block, MASK_ID,
                                           threshold)
        assert match.nodes == tuple(range(len(graph.nodes)))
        assert match.params["mask_id"].index == 2
        assert ("threshold" in match.params) == (not isinstance(threshold, torch.Tensor))


@pytest.mark.gpu
def test_confidence_topk_select_matcher(device):
    logits, block = selection_case(device, torch.bfloat16, vocab=200)
    graph, match = run_selection_match(ConfidenceTopKSelectPattern(), decode_step_topk, logits, block, MASK_ID,
                                       torch.tensor([2, 1, 3], device=device))
    assert match.nodes == tuple(range(len(graph.nodes)))


@pytest.mark.gpu
def test_confidence_read_elsewhere_splits_into_two_matches(device):
    logits, block = selection_case(device, torch.float32, vocab=200)
    graph = record(decode_step_keeping_confidence, logits, block.clone(), MASK_ID, 0.3)
    assert ConfidenceThresholdSelectPattern().match(graph) == []
    confidence_match, = TokenConfidencePattern().match(graph)
    select_match, = ThresholdSelectPattern().match(graph)
    assert set(confidence_match.nodes) | set(select_match.nodes) == set(range(len(graph.nodes)))
    env = graph_values(graph, (logits, block.clone(), MASK_ID, 0.3))
    conf, token = TokenConfidencePattern().kernel(env[confidence_match.inputs[0]])
    assert torch.equal(token, env[confidence_match.outputs[1]])
    torch.testing.assert_close(conf, env[confidence_match.outputs[0]])


@pytest.mark.gpu
def test_topk_select_matcher_alone(device):
    conf = torch.rand(2, 8, device=device)
    token = torch.randint(0, 50, (2, 8), device=device)
    block = torch.full((2, 8), MASK_ID, device=device)
    k = torch.tensor([3, 1], device=device)
    graph = record(topk_select, conf, token, block.clone(), MASK_ID, k)
    match, = TopKSelectPattern().match(graph)
    assert match.nodes == tuple(range(len(graph.nodes)))
    ref_block, fused_block = block.clone(), block.clone()
    ref = topk_select(conf, token, ref_block, MASK_ID, k)
    accept, _ = TopKSelectPattern().kernel(conf, token, fused_block, k, mask_id=MASK_ID)
    assert torch.equal(accept, ref) and torch.equal(fused_block, ref_block)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_confidence_matchers(device, dtype):
    logits = untied_logits((2, 3, 200), device, dtype)
    greedy = record(token_confidence, logits)
    match, = TokenConfidencePattern().match(greedy)
    assert match.nodes == tuple(range(len(greedy.nodes))) and SampledTokenConfidencePattern().match(greedy) == []
    conf, token = TokenConfidencePattern().kernel(logits)
    ref_conf, ref_token = greedy.execute(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf)

    sampled = record(token_confidence, logits, 0.7)
    match, = SampledTokenConfidencePattern().match(sampled)
    assert match.nodes == tuple(range(len(sampled.nodes))) and TokenConfidencePattern().match(sampled) == []
    assert match.params == {"temperature": 0.7}
    torch.manual_seed(5)
    conf, token = SampledTokenConfidencePattern().kernel(logits, **match.params)
    torch.manual_seed(5)
    assert torch.equal(SampledTokenConfidencePattern().kernel(logits, **match.params)[1], token)  # seeded by torch
    probs = torch.softmax(logits.float(), dim=-1)
    torch.testing.assert_close(conf, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1))


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [None, 1, 16])
def test_llada_vocabulary_on_gpu(splits):
    logits = untied_logits((32, 126464), "cuda", torch.bfloat16)
    conf, token = fused_token_confidence(logits, splits=splits)
    ref_conf, ref_token = token_confidence(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, atol=1e-6, rtol=1e-5)
    block = torch.full((1, 32), 126336, device="cuda")
    ref_block, fused_block = block.clone(), block.clone()
    ref_accept = threshold_select(ref_conf.view(1, 32), ref_token.view(1, 32), ref_block, 126336, 0.9)
    accept = confidence_threshold_select(logits.view(1, 32, -1), fused_block, 126336, 0.9, splits=splits)
    assert torch.equal(accept, ref_accept) and torch.equal(fused_block, ref_block)
