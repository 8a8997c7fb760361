"""CUDA-graph replay of the denoise step (needs a GPU): captured steps give the tokens of the
uncaptured ones, every step shape is captured without falling back, with and without fusion."""
import pytest
import torch

from difuse.models import load_model
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine

PROMPTS = [[10, 20, 30, 40, 50], [77, 12], [200, 201, 202, 203, 204, 205, 206, 207, 208]]
CASES = [("fixed", "none"), ("random", "dual"), ("threshold", "prefix"), ("hierarchy", "vicinity"),
         ("credit", "dual")]


def config_for(decoder, cache, **extra):
    return GenerationConfig(gen_length=16, block_length=8, decoder=decoder, cache=cache, threshold=0.05,
                            low_threshold=0.02, steps=8 if decoder in ("fixed", "random") else None,
                            prefix_look=2, after_look=2, seed=3, **extra)


@pytest.mark.cuda
@pytest.mark.parametrize("fusion", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("decoder, cache", CASES)
def test_cuda_graph_replay_gives_the_uncaptured_tokens(tiny_path, decoder, cache, fusion):
    model = load_model(tiny_path, "cuda", torch.float32)
    config = config_for(decoder, cache)
    plain = Engine(model, enable_fusion=fusion, cuda_graphs=False).generate(PROMPTS, config)
    graphs = Engine(model, enable_fusion=fusion, cuda_graphs=True)
    for _ in range(2):  # the second call replays the graphs captured by the first
        captured = graphs.generate(PROMPTS, config)
        assert [r.sequence for r in captured] == [r.sequence for r in plain]
    assert graphs.last_stats["graph_capture_errors"] == {}
    runners = [r for w in graphs._workspaces.values() for r in w.runners]
    assert runners and all(r.graph is not None for r in runners if r.calls > r.warm_up_calls)


@pytest.mark.cuda
@pytest.mark.parametrize("iteration", ["blockwise", "smooth"])
def test_bf16_generation_with_graphs_and_fusion_runs(tiny_path, iteration):
    engine = Engine.from_pretrained(str(tiny_path), device="cuda", dtype=torch.bfloat16)
    results = engine.generate(["hello", "a longer prompt"], config_for("credit", "dual", iteration=iteration))
    assert all(len(r.sequence) == 16 and r.steps > 0 for r in results)
    assert engine.last_stats["graph_capture_errors"] == {}
