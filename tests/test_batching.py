"""BlockBatcher: sequences that join a running batch at block boundaries and leave it when done
get exactly the tokens Engine.generate gives each prompt alone (greedy, fp32, fusion off)."""
import random

import pytest
import torch

from difuse.models import load_model, make_tiny_checkpoint
from difuse.runtime.batching import BlockBatcher, QueueFull, Sequence
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 300) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


def _run_staggered(batcher: BlockBatcher, sequences: list[Sequence], per_boundary: int) -> int:
    """Submit `per_boundary` sequences before each block boundary; returns the blocks run."""
    waiting, blocks = list(sequences), 0
    while waiting or not batcher.idle():
        for _ in range(min(per_boundary, len(waiting))):
            batcher.submit(waiting.pop(0))
        blocks += batcher.step().blocks
    return blocks


@pytest.mark.parametrize("decoder, cache", [("threshold", "none"), ("threshold", "dual"), ("fixed", "prefix"),
                                            ("hierarchy", "none")])
def test_rows_joining_and_leaving_get_the_tokens_of_each_prompt_alone(tiny_model, decoder, cache):
    engine = Engine(tiny_model, enable_fusion=False)
    prompts = _prompts(5)
    rng = random.Random(1)
    configs = []
    for _ in prompts:
        gen_length = 8 * rng.randrange(1, 4)
        configs.append(GenerationConfig(gen_length=gen_length, block_length=8, decoder=decoder, cache=cache,
                                        steps=gen_length // 2 if decoder == "fixed" else None, threshold=0.05,
                                        low_threshold=0.02, early_stop=False))
    alone = [engine.generate([p], c)[0] for p, c in zip(prompts, configs)]
    sequences = [Sequence(p, c) for p, c in zip(prompts, configs)]
    batcher = BlockBatcher(engine, max_batch_size=4)
    blocks = _run_staggered(batcher, sequences, per_boundary=2)
    assert [s.generated for s in sequences] == [r.sequence for r in alone]
    assert [s.steps for s in sequences] == [r.steps for r in alone]
    assert all(s.finish_reason == "length" for s in sequences)
    assert blocks < sum(c.num_blocks for c in configs)  # rows really shared blocks


def test_early_stop_leaves_the_batch_at_the_eos_block(tiny_path, tiny_model, tmp_path):
    engine = Engine(tiny_model, enable_fusion=False)
    config = GenerationConfig(gen_length=24, block_length=8, decoder="fixed", steps=12, early_stop=False)
    prompts = [[10, 20, 30, 40, 50], [77, 12]]
    free = engine.generate(prompts, config)
    candidates = [t for t in free[0].sequence[:8] if all(t not in r.sequence for r in free[1:])]
    assert candidates, "the tiny model's outputs no longer allow this test's choice of EOS"
    model = load_model(make_tiny_checkpoint(tmp_path, kind="llada", eos_token_id=candidates[0]), "cpu", torch.float32)
    engine = Engine(model, enable_fusion=False)
    config.early_stop = True
    expected = [engine.generate([p], config)[0] for p in prompts]
    sequences = [Sequence(p, config) for p in prompts]
    _run_staggered(BlockBatcher(engine), sequences, per_boundary=2)
    assert sequences[0].finish_reason == "stop" and len(sequences[0].generated) == 8
    for sequence, result in zip(sequences, expected):
        assert sequence.generated == result.sequence[:len(sequence.generated)]
        assert sequence.steps == result.steps


def test_settings_that_differ_run_in_separate_groups_and_cancel_frees_a_row(tiny_model):
    engine = Engine(tiny_model, enable_fusion=False)
    greedy = GenerationConfig(gen_length=16, block_length=8, threshold=0.05, early_stop=False)
    strict = GenerationConfig(gen_length=16, block_length=8, threshold=0.9, early_stop=False)
    events = []
    a, b, c = (Sequence([5, 6, 7], cfg, on_event=lambda s, e: events.append((s.id, e))) for cfg in (greedy, strict, greedy))
    batcher = BlockBatcher(engine, max_queue=3)
    for sequence in (a, b, c):
        batcher.submit(sequence)
    with pytest.raises(QueueFull):
        batcher.submit(Sequence([1], greedy))
    batcher.step()
    assert batcher.running == 3 and len(batcher._groups) == 2
    c.cancel()
    batcher.step()
    assert c.finish_reason == "cancelled" and a.finish_reason == b.finish_reason == "length"
    assert a.generated == engine.generate([[5, 6, 7]], greedy)[0].sequence
    assert b.generated == engine.generate([[5, 6, 7]], strict)[0].sequence
    assert batcher.idle() and [e.finish_reason for i, e in events if i == c.id] == [None, "cancelled"]


@pytest.mark.cuda
def test_fused_cuda_graph_batches_match_each_prompt_alone(tiny_path):
    """On the GPU the batcher's workspaces record, fuse and capture their steps like Engine's."""
    engine = Engine(load_model(tiny_path, "cuda", torch.float32), enable_fusion=True)
    prompts = _prompts(6, seed=5)
    configs = [GenerationConfig(gen_length=8 * (1 + i % 3), block_length=8, cache=("none", "dual")[i % 2],
                                threshold=0.05, early_stop=False) for i in range(len(prompts))]
    alone = [engine.generate([p], c)[0] for p, c in zip(prompts, configs)]
    sequences = [Sequence(p, c) for p, c in zip(prompts, configs)]
    _run_staggered(BlockBatcher(engine, max_batch_size=4), sequences, per_boundary=2)
    assert [s.generated for s in sequences] == [r.sequence for r in alone]


# batching is under test, not LLaDA2's own (block-causal) decoding, which the engine warns about
@pytest.mark.filterwarnings("ignore:LLaDA2Model was trained with block-causal attention")
@pytest.mark.parametrize("kind", ["llada_moe", "llada2"])
def test_moe_families_batch_like_each_prompt_alone(tmp_path, kind):
    engine = Engine(load_model(make_tiny_checkpoint(tmp_path, kind=kind), "cpu", torch.float32), enable_fusion=False)
    prompts = _prompts(4, seed=2)
    configs = [GenerationConfig(gen_length=8 * (1 + i % 2), block_length=8, threshold=0.05, cache="dual",
                                early_stop=False) for i in range(len(prompts))]
    alone = [engine.generate([p], c)[0].sequence for p, c in zip(prompts, configs)]
    sequences = [Sequence(p, c) for p, c in zip(prompts, configs)]
    _run_staggered(BlockBatcher(engine, max_batch_size=3), sequences, per_boundary=2)
    assert [s.generated for s in sequences] == alone
