"""enable_fusion=True gives exactly the tokens of enable_fusion=False (greedy or seeded, fp32,
CPU) for every decoder x cache mode, through the real FusionScheduler. A one-layer tiny model
keeps the Triton-interpreter kernels of the fused steps quick on CPU."""
import pytest
import torch

from difuse.models import load_model, make_tiny_checkpoint
from difuse.runtime.config import DECODERS, GenerationConfig
from difuse.runtime.engine import Engine


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-1-layer"), n_layers=1), "cpu",
                       torch.float32)
    return Engine(model, enable_fusion=False), Engine(model, enable_fusion=True)


def config_for(decoder, cache, threshold=0.04, **extra):
    return GenerationConfig(gen_length=8, block_length=4, decoder=decoder, cache=cache, threshold=threshold,
                            low_threshold=0.02, steps=4 if decoder in ("fixed", "random") else None, prefix_look=2,
                            after_look=1, seed=5, early_stop=False, prompt_multiple=1, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "vicinity"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_fusion_on_and_off_give_identical_tokens(engines, decoder, cache):
    eager, fused = engines
    config = config_for(decoder, cache)
    expected = eager.generate([[10, 20, 30]], config)[0]
    assert expected.steps > config.num_blocks  # the cached (non-refresh) step kind runs too
    assert fused.generate([[10, 20, 30]], config)[0].sequence == expected.sequence


@pytest.mark.gpu
def test_fused_batch_with_smoothing_replays_and_reports(engines):
    eager, fused = engines
    config = config_for("threshold", "dual", iteration="smooth", threshold=0.5)
    prompts = [[10, 20, 30, 40, 50], [77, 12]]
    expected = [r.sequence for r in eager.generate(prompts, config)]
    for _ in range(2):  # the second call replays the programs recorded by the first
        assert [r.sequence for r in fused.generate(prompts, config)] == expected
    # the step is recorded in the forms the pattern library knows (e.g. not under inference_mode)
    report = str(fused.fusion_report())
    for pattern in ("confidence_threshold_select", "add_rms_norm", "rope", "swiglu"):
        assert pattern in report
    with pytest.raises(ValueError, match="fusion is disabled"):
        eager.fusion_report()
