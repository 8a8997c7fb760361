"""Block diffusion (iteration='block_diffusion') on a tiny LLaDA2: the exact prefix cache gives,
token for token, what a cache-free loop gives that reruns the full block-causal forward over
every column up to the block's end at each step; the cache holds exactly the full forward's K/V;
fusion on equals fusion off; a batch equals its prompts alone; bidirectional models are refused."""
from types import SimpleNamespace

import pytest
import torch
from host_sync import NoHostSync

from difuse.models import block_causal_bias, load_model, make_tiny_checkpoint
from difuse.runtime.batching import BlockBatcher, Sequence
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine
from difuse.runtime.kv_cache import StaticKVCache
from difuse.runtime.layout import lay_out

BLOCK, GEN, THRESHOLD = 4, 12, 0.04
PROMPTS = [[5, 17, 99, 3, 250], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]  # 2 and 3 prompt blocks


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llada2"), kind="llada2",
                                           dtype=torch.float32), "cpu", torch.float32)


def config_for(decoder: str, early_stop: bool = False) -> GenerationConfig:
    return GenerationConfig(gen_length=GEN, block_length=BLOCK, decoder=decoder, threshold=THRESHOLD,
                            steps=6 if decoder == "fixed" else None, cache="prefix", iteration="block_diffusion",
                            early_stop=early_stop, prompt_multiple=1)


def official_layout(model, prompt):
    """LLaDA2's own generate(): blocks of BLOCK tokens from the prompt's first token, the prompt
    then masks up to the end of the block that holds the last requested token. Returns tokens,
    positions [1, L] and the block-causal bias [1, 1, L, L]."""
    total = -(-(len(prompt) + GEN) // BLOCK) * BLOCK
    tokens = torch.full((1, total), model.config.mask_token_id)
    tokens[0, :len(prompt)] = torch.tensor(prompt)
    return tokens, torch.arange(total)[None], block_causal_bias(total, BLOCK)


def reference_generate(model, prompt, decoder: str) -> list[int]:
    """No cache: every step is the full block-causal forward over columns [0, block_end). The
    block holding the prompt's tail is the first one decoded; the tokens past GEN are decoded
    with the last block and dropped."""
    tokens, positions, bias = official_layout(model, prompt)
    mask_id, length = model.config.mask_token_id, tokens.shape[1]
    steps_per_block = 6 * BLOCK // GEN
    for block_start in range(len(prompt) // BLOCK * BLOCK, length, BLOCK):
        end = block_start + BLOCK
        masks_at_start, step = int((tokens[0, block_start:end] == mask_id).sum()), 0
        while (tokens[0, block_start:end] == mask_id).any():
            hidden = model.forward(tokens[:, :end], positions[:, :end], attention_bias=bias[..., :end, :end])
            probs = torch.softmax(model.compute_logits(hidden[:, block_start:end]).float(), dim=-1)[0]
            confidence, token = probs.max(dim=-1)  # [N]
            masked = tokens[0, block_start:end] == mask_id
            confidence = torch.where(masked, confidence, float("-inf"))
            if decoder == "threshold":
                accept = masked & ((confidence >= THRESHOLD) | (confidence == confidence.max()))
            else:
                count = masks_at_start // steps_per_block + int(step < masks_at_start % steps_per_block)
                order = torch.sort(confidence, descending=True, stable=True).indices[:count]
                accept = torch.zeros_like(masked).index_fill_(0, order, True) & masked
            tokens[0, block_start:end] = torch.where(accept, token, tokens[0, block_start:end])
            step += 1
    return tokens[0, len(prompt):len(prompt) + GEN].tolist()


@pytest.mark.parametrize("decoder", ["threshold", "fixed"])
@pytest.mark.parametrize("prompt", PROMPTS + [[7, 8, 9], list(range(60, 68))],
                         ids=["tail-of-1", "tail-of-3", "shorter-than-a-block", "whole-blocks"])
def test_cached_block_diffusion_equals_the_cache_free_reference(llada2, decoder, prompt):
    result = Engine(llada2, enable_fusion=False).generate([prompt], config_for(decoder))[0]
    expected = reference_generate(llada2, prompt, decoder)
    assert result.sequence == expected
    assert llada2.config.mask_token_id not in expected
    if decoder == "threshold":  # every step commits at least its row's top-1: no more steps than masks decoded
        assert result.steps <= -(-(len(prompt) + GEN) // BLOCK) * BLOCK - len(prompt)


def test_cache_holds_the_full_block_causal_forward(llada2):
    engine = Engine(llada2, enable_fusion=False)
    prompt = PROMPTS[0]
    result = engine.generate([prompt], config_for("threshold"))[0]
    workspace = next(iter(engine._workspaces.values()))
    tokens, positions, bias = official_layout(llada2, prompt)  # one prompt: the engine's layout has no pad
    tokens[0, len(prompt):len(prompt) + GEN] = torch.tensor(result.sequence)
    length, m = tokens.shape[1], llada2
    assert workspace.length == length
    full = StaticKVCache(m.num_layers, 1, m.num_kv_heads, length, m.head_dim, torch.float32, "cpu")
    full.bind(torch.arange(length), bias)
    m.forward(tokens, positions, cache=full)
    final_block = length - BLOCK  # its K/V is from its last step's input: no later block needs it
    for mine, exact in zip(workspace.cache.keys + workspace.cache.values, full.keys + full.values):
        torch.testing.assert_close(mine[..., :final_block, :], exact[..., :final_block, :], rtol=1e-5, atol=1e-5)


def test_layout_puts_every_row_on_its_own_block_grid():
    """Left pads are whole blocks, every row's first decoded block is at the same columns and
    starts with its prompt's tail, and a row's last block runs to its grid's end."""
    prompts = [[1] * 5, [2] * 11, [3] * 8]
    ids = SimpleNamespace(mask_token_id=9, pad_token_id=0, eos_token_id=1)
    layout = lay_out(prompts, [GEN] * 3, config_for("threshold"), ids, torch.float32)
    assert layout.first_block == 8 and layout.length == 8 + GEN + BLOCK
    assert layout.gen_starts == [9, 11, 8]
    pads = [4, 0, 0]
    for row, (prompt, pad, start) in enumerate(zip(prompts, pads, layout.gen_starts)):
        end = pad + -(-(len(prompt) + GEN) // BLOCK) * BLOCK
        assert layout.tokens[row, pad:start].tolist() == prompt
        assert (layout.tokens[row, start:end] == 9).all()
        real = layout.key_bias[row, 0, 0] == 0
        assert real.nonzero().flatten().tolist() == list(range(pad, end))
        assert layout.positions[row, pad:end].tolist() == list(range(end - pad))


def test_prompt_tokens_in_the_first_block_do_not_stop_the_row(llada2):
    """Early stop looks at generated columns only: the block holding the prompt's tail may hold EOS."""
    prompt = PROMPTS[0]
    original = llada2.config.eos_token_id
    llada2.config.eos_token_id = prompt[-1]  # in the first decoded block, before the generation
    try:
        stopped = Engine(llada2, enable_fusion=False).generate([prompt], config_for("threshold", early_stop=True))[0]
        full = Engine(llada2, enable_fusion=False).generate([prompt], config_for("threshold"))[0]
    finally:
        llada2.config.eos_token_id = original
    first = full.sequence.index(prompt[-1]) if prompt[-1] in full.sequence else GEN
    assert stopped.sequence[:first + 1] == full.sequence[:first + 1]


def test_a_batch_equals_each_prompt_alone(llada2):
    engine = Engine(llada2, enable_fusion=False)
    config = config_for("threshold")
    together = engine.generate(PROMPTS, config)
    assert [r.sequence for r in together] == [engine.generate([p], config)[0].sequence for p in PROMPTS]


def test_a_batch_that_shrinks_carries_its_cache(llada2):
    """Early stop retires row 0 after its first block; row 1 goes on from the prefix cache the
    smaller batch took over and gives what it gives alone."""
    config = config_for("threshold", early_stop=True)
    # a row's first block holds its prompt's tail: BLOCK - len % BLOCK generated tokens
    first_blocks = [Engine(llada2, enable_fusion=False).generate([p], config)[0].sequence[:BLOCK - len(p) % BLOCK]
                    for p in PROMPTS]
    stand_in = next(t for t in first_blocks[0] if t not in first_blocks[1])  # plays EOS for row 0 only
    original = llada2.config.eos_token_id
    llada2.config.eos_token_id = stand_in
    try:
        together = Engine(llada2, enable_fusion=False).generate(PROMPTS, config)
        alone = [Engine(llada2, enable_fusion=False).generate([p], config)[0].sequence for p in PROMPTS]
    finally:
        llada2.config.eos_token_id = original
    done = len(first_blocks[0])
    assert together[0].sequence[done:] == [stand_in] * (GEN - done)
    assert [r.sequence for r in together] == alone


@pytest.mark.gpu
def test_fusion_on_equals_fusion_off(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, kind="llada2", dtype=torch.float32,
                                       num_hidden_layers=2), "cpu",
                       torch.float32)
    config = config_for("threshold")
    eager = Engine(model, enable_fusion=False).generate(PROMPTS, config)
    fused = Engine(model, enable_fusion=True)
    for _ in range(2):  # the second call replays the programs recorded by the first
        assert [r.sequence for r in fused.generate(PROMPTS, config)] == [r.sequence for r in eager]
    report = str(fused.fusion_report())
    for pattern in ("confidence_threshold_select", "add_rms_norm", "rope", "qk_norm"):
        assert pattern in report


@pytest.mark.cuda
@pytest.mark.parametrize("fusion", [False, True], ids=["eager", "fused"])
def test_cuda_graph_replay_gives_the_uncaptured_tokens(tmp_path, fusion):
    model = load_model(make_tiny_checkpoint(tmp_path, kind="llada2", dtype=torch.float32), "cuda", torch.float32)
    config = config_for("threshold")
    plain = Engine(model, enable_fusion=fusion, cuda_graphs=False).generate(PROMPTS, config)
    graphs = Engine(model, enable_fusion=fusion, cuda_graphs=True)
    for _ in range(2):  # the second call replays the graphs the first one captured
        assert [r.sequence for r in graphs.generate(PROMPTS, config)] == [r.sequence for r in plain]
    assert graphs.last_stats["graph_capture_errors"] == {}
    runners = [r for w in graphs._workspaces.values() for r in w.runners]
    assert runners and all(r.graph is not None for r in runners if r.calls > r.warm_up_calls)


def test_bidirectional_models_and_other_caches_are_refused(tmp_path):
    dense = load_model(make_tiny_checkpoint(tmp_path, kind="llada"), "cpu", torch.float32)
    with pytest.raises(ValueError, match="block-causal"):
        Engine(dense, enable_fusion=False).generate([[1, 2, 3]], config_for("threshold"))
    with pytest.raises(ValueError, match="block-causal"):
        BlockBatcher(Engine(dense, enable_fusion=False)).submit(Sequence([1, 2, 3], config_for("threshold")))
    with pytest.raises(ValueError, match="cache='prefix'"):
        GenerationConfig(gen_length=GEN, block_length=BLOCK, cache="dual", iteration="block_diffusion")


def test_dynamic_batching_gives_each_prompt_alone(llada2):
    """BlockBatcher: rows join at block boundaries; every new layout prefills its prefix cache."""
    engine = Engine(llada2, enable_fusion=False)
    prompts = PROMPTS + [[7, 8, 9], [200, 201, 202, 203, 204, 205, 206]]
    configs = [config_for(decoder) for decoder in ("threshold", "fixed", "threshold", "fixed")]
    alone = [engine.generate([p], c)[0].sequence for p, c in zip(prompts, configs)]
    sequences = [Sequence(p, c) for p, c in zip(prompts, configs)]
    batcher, waiting = BlockBatcher(engine, max_batch_size=3), list(sequences)
    while waiting or not batcher.idle():
        if waiting:
            batcher.submit(waiting.pop(0))  # one joins before each block boundary
        batcher.step()
    assert [s.generated for s in sequences] == alone


@pytest.mark.parametrize("step_in_block", [0, 1], ids=["block-pair", "block"])
def test_block_diffusion_steps_have_no_host_sync(llada2, step_in_block):
    """Both step kinds stay capturable in a CUDA graph: no value read back, no dynamic shape."""
    engine = Engine(llada2, enable_fusion=False)
    config = config_for("threshold")
    length, block_start = 8 + GEN, 12
    workspace = engine._workspace(config, 1, length)
    workspace.tokens.fill_(llada2.config.mask_token_id)
    workspace.prefill(8)
    workspace.start_block(block_start)
    kind = workspace.policy.step_kind(step_in_block, block_start, length)
    runner, _, _ = workspace._runner(kind)
    workspace.run_step(kind, block_start)  # places the rows and the bias outside the check
    with NoHostSync():
        runner()
