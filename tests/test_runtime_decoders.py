"""Each decoder's rule on crafted logits: the accepted positions, the tokens written, and that
nothing outside the still-masked positions changes; all without a host sync."""
import pytest
import torch
from host_sync import NoHostSync

from difuse.runtime.decoders import CreditDecoder, FixedScheduleDecoder, HierarchyDecoder, ThresholdDecoder

MASK, V = 9, 10


def crafted_logits(top_tokens, confidences) -> torch.Tensor:
    """Logits [B, N, V] whose softmax puts `confidence` on `top_token` and spreads the rest evenly."""
    top = torch.tensor(top_tokens)
    confidence = torch.tensor(confidences, dtype=torch.float64)
    probs = ((1 - confidence) / (V - 1)).unsqueeze(-1).expand(*top.shape, V).clone()
    probs.scatter_(-1, top.unsqueeze(-1), confidence.unsqueeze(-1))
    return probs.log().float()


def run(decoder, logits, block, threshold=0.5, low_threshold=0.3, state=None):
    """Runs one decoder step; returns the positions it committed and the decoder state."""
    state = state if state is not None else decoder.init_state(block.shape[0], block.shape[1], V, "cpu")
    masked = block == MASK
    with NoHostSync():
        assert decoder(logits, block, state, torch.tensor(threshold), torch.tensor(low_threshold)) is None
    return masked & (block != MASK), state


def test_threshold_accepts_everything_above_and_the_row_top1():
    block = torch.tensor([[MASK, MASK, 5, MASK, MASK], [MASK, MASK, MASK, MASK, 7]])
    logits = crafted_logits([[1, 2, 3, 4, 5], [6, 7, 8, 1, 2]],
                            [[0.6, 0.2, 0.99, 0.58, 0.1], [0.3, 0.4, 0.2, 0.35, 0.9]])
    accept, _ = run(ThresholdDecoder(MASK, 0.0), logits, block, threshold=0.55)
    # row 0: 0.6 and 0.58 reach the threshold (0.99 is not masked); row 1: nothing does, top-1 only
    assert accept.tolist() == [[True, False, False, True, False], [False, True, False, False, False]]
    assert block.tolist() == [[1, MASK, 5, 4, MASK], [MASK, 7, MASK, MASK, 7]]


def test_a_step_on_a_finished_block_changes_nothing():
    block = torch.tensor([[1, 2, 3, 4]])
    logits = crafted_logits([[5, 5, 5, 5]], [[0.99] * 4])
    for decoder in (ThresholdDecoder(MASK, 0.0), HierarchyDecoder(MASK, 0.0), CreditDecoder(MASK, 0.0, 0.7, 0.2, 0.8),
                    FixedScheduleDecoder(MASK, 0.0, steps=2, random_order=False)):
        state = decoder.init_state(1, 4, V, "cpu")
        decoder.start_block(state, block)
        accept, _ = run(decoder, logits, block, state=state)
        assert not accept.any() and block.tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("random_order", [False, True])
def test_fixed_schedule_commits_llada_counts(random_order):
    # 7 masks over 3 steps: floor(7/3) + 1 = 3 in the first 7 % 3 = 1 step, then 2, 2
    block = torch.tensor([[MASK, 4, MASK, MASK, MASK, MASK, MASK, MASK], [MASK] * 8])
    confidences = [[0.1, 0.9, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5], [0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18]]
    logits = crafted_logits([[3] * 8, [2] * 8], confidences)
    decoder = FixedScheduleDecoder(MASK, 0.0, steps=3, random_order=random_order)
    state = decoder.init_state(2, 8, V, "cpu")
    decoder.start_block(state, block)
    counts = []
    for _ in range(3):
        accept, _ = run(decoder, logits, block, state=state)
        counts.append(accept.sum(-1).tolist())
    assert counts == [[3, 3], [2, 3], [2, 2]]  # row 1 has 8 masks: 3, 3, 2
    assert (block != MASK).all() and block[0, 1] == 4
    if not random_order:  # most confident first: row 0's first step takes 0.8, 0.7, 0.6
        first = FixedScheduleDecoder(MASK, 0.0, steps=3, random_order=False)
        fresh = torch.tensor([[MASK, 4, MASK, MASK, MASK, MASK, MASK, MASK]])
        state = first.init_state(1, 8, V, "cpu")
        first.start_block(state, fresh)
        accept, _ = run(first, logits[:1], fresh, state=state)
        assert accept[0].nonzero().flatten().tolist() == [2, 4, 6]


def test_hierarchy_takes_the_best_of_each_masked_run_above_low_threshold():
    # runs of masks: row 0 -> [0, 1, 2], [4, 5], [7]; row 1 -> [0..7] one run
    block = torch.tensor([[MASK, MASK, MASK, 1, MASK, MASK, 2, MASK], [MASK] * 8])
    confidences = [[0.35, 0.5, 0.4, 0.9, 0.2, 0.25, 0.9, 0.45],
                   [0.31, 0.32, 0.95, 0.33, 0.34, 0.36, 0.92, 0.2]]
    logits = crafted_logits([[5] * 8, [6] * 8], confidences)
    accept, _ = run(HierarchyDecoder(MASK, 0.0), logits, block, threshold=0.9, low_threshold=0.3)
    # row 0: run bests 0.5 (pos 1), 0.25 (below low: not taken), 0.45 (pos 7); top-1 is pos 1 too
    # row 1: 0.95 and 0.92 reach the threshold; the run's best (0.95) is already among them
    assert accept.tolist() == [[False, True, False, False, False, False, False, True],
                               [False, False, True, False, False, False, True, False]]
    assert block[0].tolist() == [MASK, 5, MASK, 1, MASK, MASK, 2, 5]


def test_credit_matches_its_definition_over_steps():
    torch.manual_seed(0)
    alpha, gamma, beta = 0.7, 0.2, 0.8
    decoder = CreditDecoder(MASK, 0.0, alpha, gamma, beta)
    block = torch.full((2, 6), MASK)
    block[1, 2] = 3
    state = decoder.init_state(2, 6, V, "cpu")
    decoder.start_block(state, block)
    credit = torch.zeros(2, 6, V)
    for step in range(3):
        logits = torch.randn(2, 6, V) * 2
        logits[..., MASK] = -30.0  # committing the mask token itself would look like no commit
        masked = block == MASK
        if step:
            credit *= beta
        probs = logits.softmax(-1)
        for b in range(2):
            for i in range(6):
                if masked[b, i]:
                    top = probs[b, i].argmax()
                    credit[b, i, top] += probs[b, i, top] ** gamma
        boosted = (logits + alpha * torch.log1p(credit)).softmax(-1)
        confidence, token = boosted.max(-1)
        confidence = torch.where(masked, confidence, -1.0)
        expected = masked & ((confidence >= 0.6) | (confidence == confidence.amax(-1, keepdim=True)))
        expected_block = torch.where(expected, token, block)
        accept, _ = run(decoder, logits, block, threshold=0.6, state=state)
        torch.testing.assert_close(state["credit"], credit)
        assert torch.equal(accept, expected) and torch.equal(block, expected_block)


def test_temperature_samples_masked_positions_only():
    block = torch.tensor([[MASK, 1, MASK, MASK]])
    logits = torch.randn(1, 4, V)
    logits[..., MASK] = -30.0
    accept, _ = run(ThresholdDecoder(MASK, 1.0), logits, block, threshold=1.0)
    assert accept.sum() == 1 and block[0, 1] == 1 and (block == MASK).sum() == 2
