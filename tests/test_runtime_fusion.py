"""enable_fusion=True gives exactly the tokens of enable_fusion=False (greedy or seeded, fp32,
CPU) for every decoder x cache mode, through the real FusionScheduler."""
import pytest
import torch
from runtime_fixtures import tiny_model, tiny_path  # noqa: F401 - fixtures

from difuse.runtime.config import DECODERS, GenerationConfig
from difuse.runtime.engine import Engine

PROMPTS = [[10, 20, 30, 40, 50], [77, 12]]


@pytest.fixture(scope="module")
def engines(tiny_model):
    return Engine(tiny_model, enable_fusion=False), Engine(tiny_model, enable_fusion=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "vicinity"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_fusion_on_and_off_give_identical_tokens(engines, decoder, cache):
    config = GenerationConfig(gen_length=8, block_length=4, decoder=decoder, cache=cache, threshold=0.05,
                              low_threshold=0.02, steps=4 if decoder in ("fixed", "random") else None,
                              prefix_look=2, after_look=1, seed=5, early_stop=False)
    eager, fused = engines
    expected = [r.sequence for r in eager.generate(PROMPTS, config)]
    assert [r.sequence for r in fused.generate(PROMPTS, config)] == expected
    assert [r.sequence for r in fused.generate(PROMPTS, config)] == expected  # replaying recorded programs


def test_fused_smoothing_and_the_fusion_report(engines):
    config = GenerationConfig(gen_length=8, block_length=4, decoder="threshold", iteration="smooth", cache="dual",
                              threshold=0.5)
    eager, fused = engines
    assert [r.sequence for r in fused.generate(PROMPTS, config)] == [r.sequence for r in eager.generate(PROMPTS, config)]
    assert fused.fusion_report() is not None
    with pytest.raises(ValueError, match="fusion is disabled"):
        eager.fusion_report()
