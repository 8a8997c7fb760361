"""GenerationConfig: every setting of one generate() call, validated up front so a bad setting
fails before any model work with a message that names the setting and the allowed values."""
from __future__ import annotations

from dataclasses import dataclass

DECODERS = ("fixed", "random", "threshold", "hierarchy", "credit")
CACHES = ("none", "prefix", "dual", "vicinity")
ITERATIONS = ("blockwise", "smooth", "block_diffusion")


@dataclass(slots=True)
class GenerationConfig:
    gen_length: int = 64
    block_length: int = 32
    decoder: str = "threshold"
    # fixed / random: denoise steps over the whole generation (LLaDA's `steps`), split evenly
    # over the blocks; each block commits floor(M/s)+1 tokens in its first M % s steps, else floor(M/s)
    steps: int | None = None
    threshold: float = 0.9
    low_threshold: float = 0.4  # hierarchy: best token of a masked run is kept above this
    credit_alpha: float = 0.7  # credit: logits + alpha * log(1 + credit)
    credit_gamma: float = 0.2  # credit: top-1 probability boost exponent
    credit_beta: float = 0.8  # credit: per-step decay of the credit
    temperature: float = 0.0
    cache: str = "none"
    prefix_look: int = 16  # vicinity: tokens recomputed before the block
    after_look: int = 16  # vicinity: tokens recomputed after the block
    refresh_every: int | None = None  # refresh the cache also every n steps inside a block
    # block_diffusion: block-causal models (LLaDA2) only, with cache='prefix' (exact, see runtime/kv_cache.py)
    iteration: str = "blockwise"
    # smooth: masked inputs get E[mask] + w * E[softmax(logits)], w = min(init + growth * step, max)
    smooth_weight: float = 0.3
    smooth_weight_init: float = 0.15
    smooth_weight_growth: float = 0.02
    smooth_threshold_decay: float = 0.02  # threshold = max(1 - decay * step, threshold)
    unroll: int | None = None  # steps per host check; None: masks left // expected_tokens_per_step
    max_unroll: int = 4
    expected_tokens_per_step: int = 8
    early_stop: bool = True
    batch_size: int = 8  # prompts run together; longer lists are split into chunks
    prompt_multiple: int = 8  # left-pad prompts to a multiple of this: fewer shapes to capture
    seed: int | None = None

    def __post_init__(self):
        _positive("gen_length", self.gen_length)
        _positive("block_length", self.block_length)
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} must be a multiple of block_length {self.block_length}")
        _choice("decoder", self.decoder, DECODERS)
        _choice("cache", self.cache, CACHES)
        _choice("iteration", self.iteration, ITERATIONS)
        if self.decoder in ("fixed", "random"):
            self._validate_fixed_schedule()
        elif self.steps is not None:
            raise ValueError(f"steps applies to the fixed/random decoders only, not to {self.decoder!r} "
                             "(which decodes until the block has no masks left)")
        _unit_interval("threshold", self.threshold)
        _unit_interval("low_threshold", self.low_threshold)
        if self.decoder == "hierarchy" and self.low_threshold > self.threshold:
            raise ValueError(f"low_threshold {self.low_threshold} must not exceed threshold {self.threshold}")
        if self.credit_alpha < 0 or self.credit_gamma <= 0 or not 0 < self.credit_beta <= 1:
            raise ValueError("credit parameters need credit_alpha >= 0, credit_gamma > 0, 0 < credit_beta <= 1; "
                             f"got {self.credit_alpha}, {self.credit_gamma}, {self.credit_beta}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.prefix_look < 0 or self.after_look < 0:
            raise ValueError(f"prefix_look/after_look must be >= 0, got {self.prefix_look}/{self.after_look}")
        if self.refresh_every is not None:
            _positive("refresh_every", self.refresh_every)
            if self.cache == "none":
                raise ValueError("refresh_every needs a cache (cache='prefix', 'dual' or 'vicinity')")
        if self.iteration == "block_diffusion" and (self.cache != "prefix" or self.refresh_every is not None):
            raise ValueError("iteration='block_diffusion' keeps an exact block-causal prefix cache: set cache='prefix' "
                             f"and no refresh_every (got cache={self.cache!r}, refresh_every={self.refresh_every})")
        if self.iteration == "smooth":
            if self.decoder not in ("threshold", "hierarchy", "credit"):
                raise ValueError(f"iteration='smooth' schedules a threshold; decoder {self.decoder!r} has none")
            if not 0 <= self.smooth_weight_init <= self.smooth_weight:
                raise ValueError("smooth weights need 0 <= smooth_weight_init <= smooth_weight")
        if self.unroll is not None:
            _positive("unroll", self.unroll)
        _positive("max_unroll", self.max_unroll)
        _positive("expected_tokens_per_step", self.expected_tokens_per_step)
        _positive("batch_size", self.batch_size)
        _positive("prompt_multiple", self.prompt_multiple)

    def _validate_fixed_schedule(self):
        blocks = self.gen_length // self.block_length
        if self.steps is None:
            raise ValueError(f"decoder {self.decoder!r} needs steps (the fixed schedule's step count)")
        _positive("steps", self.steps)
        if self.steps % blocks:
            raise ValueError(f"steps {self.steps} must be a multiple of the number of blocks "
                             f"gen_length / block_length = {blocks} (LLaDA splits steps evenly over blocks)")
        if self.steps // blocks > self.block_length:
            raise ValueError(f"steps per block {self.steps // blocks} exceeds block_length {self.block_length}: "
                             "some steps would commit no token")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int | None:
        return None if self.steps is None else self.steps // self.num_blocks


def iteration_and_cache(iteration: str | None, cache: str | None, trained: dict) -> tuple[str, str]:
    """Fill what the user left open from the checkpoint's defaults (models.generation_defaults):
    block-causal models (LLaDA2) decode with block diffusion, whose exact cache is the prefix cache,
    unless the user chose another cache, which only blockwise decoding has; the others decode
    blockwise without a cache."""
    if iteration is None:
        iteration = trained.get("iteration", "blockwise")
        if iteration == "block_diffusion" and cache not in (None, "prefix"):
            iteration = "blockwise"
    return iteration, cache or ("prefix" if iteration == "block_diffusion" else "none")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _unit_interval(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
