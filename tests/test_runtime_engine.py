"""End-to-end generation with the tiny checkpoint (fusion off; fusion on is compared in
test_runtime_fusion.py): LLaDA's reference loop, batching with padding, early stop, unrolling."""
import pytest
import torch
from host_sync import NoHostSync

from difuse.models import load_model, make_tiny_checkpoint
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine

PROMPTS = [[10, 20, 30, 40, 50], [77, 12], [200, 201, 202, 203, 204, 205, 206, 207, 208]]


def llada_reference(model, prompts, gen_length, block_length, steps):
    """ML-GSAI/LLaDA generate.py (models.md §1), temperature 0, low-confidence remasking, cfg 0:
    full-sequence forward every step, fp64 softmax, per-row top-k of the fixed schedule."""
    mask_id = model.config.mask_token_id
    x = torch.full((len(prompts), len(prompts[0]) + gen_length), mask_id)
    x[:, :len(prompts[0])] = torch.tensor(prompts)
    positions = torch.arange(x.shape[1]).expand_as(x)
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    for b in range(blocks):
        start = len(prompts[0]) + b * block_length
        end = start + block_length
        masks = (x[:, start:end] == mask_id).sum(dim=1, keepdim=True)
        schedule = (masks // steps_per_block).expand(-1, steps_per_block).clone()
        for row in range(len(prompts)):
            schedule[row, :int(masks[row] % steps_per_block)] += 1
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model.compute_logits(model.forward(x, positions))
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-float("inf"), dtype=torch.float64))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(len(prompts)):
                _, chosen = torch.topk(confidence[row], k=int(schedule[row, i]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
    return x[:, len(prompts[0]):].tolist()


@torch.inference_mode()
def test_fixed_schedule_without_cache_reproduces_llada_reference(tiny_model):
    prompts = [[10, 20, 30, 40, 50], [90, 91, 92, 93, 94]]
    config = GenerationConfig(gen_length=16, block_length=8, decoder="fixed", steps=8, early_stop=False,
                              prompt_multiple=1)
    results = Engine(tiny_model, enable_fusion=False).generate(prompts, config)
    expected = llada_reference(tiny_model, prompts, 16, 8, 8)
    assert [r.sequence for r in results] == expected
    assert [r.steps for r in results] == [8, 8] and all(r.tokens_per_step == 2 for r in results)


@pytest.mark.parametrize("decoder, cache", [("threshold", "dual"), ("fixed", "none"), ("hierarchy", "prefix")])
def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_model, decoder, cache):
    config = GenerationConfig(gen_length=16, block_length=8, decoder=decoder, steps=8 if decoder == "fixed" else None,
                              cache=cache, threshold=0.05, low_threshold=0.02, early_stop=False, prompt_multiple=1)
    engine = Engine(tiny_model, enable_fusion=False)
    together = engine.generate(PROMPTS, config)
    alone = [engine.generate([p], config)[0] for p in PROMPTS]
    assert [r.sequence for r in together] == [r.sequence for r in alone]
    assert [r.steps for r in together] == [r.steps for r in alone]


def test_early_stop_ends_rows_at_eos_and_the_rest_continue(tiny_path, tiny_model, tmp_path):
    config = GenerationConfig(gen_length=24, block_length=8, decoder="fixed", steps=12, early_stop=False)
    free = Engine(tiny_model, enable_fusion=False).generate(PROMPTS, config)
    # an "EOS" that row 0 produces in its first block and row 1 never produces
    candidates = [t for t in free[0].sequence[:8] if t not in free[1].sequence]
    assert candidates, "the tiny model's outputs no longer allow this test's choice of EOS"
    eos = candidates[0]
    model = load_model(make_tiny_checkpoint(tmp_path, kind="llada", eos_token_id=eos), "cpu", torch.float32)
    engine = Engine(model, enable_fusion=False)
    config.early_stop = True
    stopped = engine.generate(PROMPTS, config)
    first = free[0].sequence.index(eos)
    assert stopped[0].sequence == free[0].sequence[:8] + [eos] * 16
    assert stopped[0].tokens == free[0].sequence[:first]
    assert stopped[0].steps == 4  # 12 steps over 3 blocks: row 0 ran one block
    assert stopped[1].sequence == free[1].sequence and stopped[1].steps == 12
    for free_row, row in zip(free, stopped):
        if eos in free_row.sequence[:8]:
            assert row.sequence[8:] == [eos] * 16
    assert engine.last_stats["forwards"] == 12  # the batch shrank but kept going for row 1


def test_unrolling_issues_noop_steps_and_counts_only_real_ones(tiny_model):
    base = dict(gen_length=16, block_length=8, decoder="threshold", threshold=0.05, early_stop=False, prompt_multiple=1)
    engine = Engine(tiny_model, enable_fusion=False)
    checked = engine.generate([PROMPTS[0]], GenerationConfig(unroll=1, **base))[0]
    forwards_checked = engine.last_stats["forwards"]
    unrolled = engine.generate([PROMPTS[0]], GenerationConfig(unroll=5, **base))[0]
    assert unrolled.sequence == checked.sequence and unrolled.steps == checked.steps
    assert forwards_checked == checked.steps
    assert engine.last_stats["forwards"] % 5 == 0 and engine.last_stats["forwards"] >= checked.steps


@pytest.mark.parametrize("cache", ["none", "dual", "vicinity"])
def test_iteration_smoothing_with_cache_refreshes(tiny_model, cache):
    # threshold 1: exactly the top-1 per step, so 8 steps per block and refreshes at steps 0, 3, 6
    config = GenerationConfig(gen_length=16, block_length=8, decoder="credit", iteration="smooth", cache=cache,
                              threshold=1.0, prefix_look=2, after_look=2, unroll=1, early_stop=False,
                              refresh_every=None if cache == "none" else 3)
    engine = Engine(tiny_model, enable_fusion=False)
    result = engine.generate([PROMPTS[0]], config)[0]
    assert tiny_model.config.mask_token_id not in result.sequence and len(result.sequence) == 16
    assert result.steps == 16 and engine.last_stats["forwards"] == 16
    assert result.cache_refreshes == (0 if cache == "none" else 6)


@pytest.mark.parametrize("decoder", ["fixed", "random", "threshold", "hierarchy", "credit"])
def test_a_whole_step_has_no_host_sync(tiny_model, decoder):
    config = GenerationConfig(gen_length=8, block_length=4, decoder=decoder, steps=2 if decoder in ("fixed", "random")
                              else None, cache="dual", early_stop=False)
    engine = Engine(tiny_model, enable_fusion=False)
    workspace = engine._workspace(config, 1, 16)
    workspace.tokens.fill_(tiny_model.config.mask_token_id)
    workspace.start_block(8)
    for step_in_block in range(2):  # the refresh step and the dual step
        kind = workspace.policy.step_kind(step_in_block, 8, 16)
        runner, _, _ = workspace._runner(kind)
        workspace.run_step(kind, 8)  # builds the step's index tensors outside the check
        with NoHostSync():
            runner()


def test_text_prompts_go_through_the_chat_template(tiny_path):
    engine = Engine.from_pretrained(str(tiny_path), enable_fusion=False)
    config = GenerationConfig(gen_length=8, block_length=4, decoder="threshold", early_stop=False)
    result = engine.generate(["hello"], config)[0]
    assert isinstance(result.text, str) and len(result.sequence) == 8
    with pytest.raises(ValueError, match="maximum sequence length"):
        engine.generate(["x" * 600], config)


def test_the_length_limit_counts_positions_not_padding(tiny_model):
    """A prompt + generation that fills the model's positions exactly runs, though its left padding
    (to a multiple of 16) makes the buffer longer; one token more is refused."""
    limit = tiny_model.config.max_sequence_length
    engine = Engine(tiny_model, enable_fusion=False)
    config = GenerationConfig(gen_length=8, block_length=4, decoder="threshold", early_stop=False,
                              prompt_multiple=16)
    [result] = engine.generate([[7] * (limit - 8)], config)
    assert len(result.sequence) == 8
    with pytest.raises(ValueError, match=f"prompt \\({limit - 7} tokens\\) \\+ gen_length 8 exceeds"):
        engine.generate([[7] * (limit - 7)], config)
