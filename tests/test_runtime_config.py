import pytest

from difuse.runtime.config import GenerationConfig


@pytest.mark.parametrize("settings, message", [
    (dict(gen_length=30, block_length=8), "multiple of block_length"),
    (dict(gen_length=0), "gen_length must be a positive integer"),
    (dict(block_length=4.0), "block_length must be a positive integer"),
    (dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
    (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
    (dict(decoder="greedy"), "unknown decoder 'greedy'; choose one of fixed, random"),
    (dict(cache="paged"), "unknown cache 'paged'"),
    (dict(iteration="spiral"), "unknown iteration 'spiral'"),
    (dict(decoder="fixed"), "needs steps"),
    (dict(decoder="fixed", gen_length=64, block_length=16, steps=6), "multiple of the number of blocks"),
    (dict(decoder="random", gen_length=16, block_length=4, steps=32), "exceeds block_length"),
    (dict(decoder="threshold", steps=8), "steps applies to the fixed/random decoders only"),
    (dict(decoder="hierarchy", threshold=0.5, low_threshold=0.7), "low_threshold 0.7 must not exceed"),
    (dict(decoder="credit", credit_beta=1.5), "credit parameters"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(cache="vicinity", prefix_look=-1), "prefix_look/after_look must be >= 0"),
    (dict(refresh_every=4), "refresh_every needs a cache"),
    (dict(iteration="smooth", decoder="fixed", steps=2), "iteration='smooth' schedules a threshold"),
    (dict(unroll=0), "unroll must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_settings_are_refused_with_a_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings)


def test_fixed_schedule_steps_are_split_over_blocks():
    config = GenerationConfig(gen_length=64, block_length=16, decoder="fixed", steps=32)
    assert (config.num_blocks, config.steps_per_block) == (4, 8)
    assert GenerationConfig().steps_per_block is None
