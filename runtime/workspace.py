"""Workspace: the static tensors of one (batch size, sequence length, step structure) bucket and
the StepRunners of each step kind, reused across blocks and across generate() calls so that
fusion recordings and CUDA graphs are made once per bucket."""
from __future__ import annotations

import warnings

import torch

from difuse.runtime.capture import StepRunner
from difuse.runtime.config import GenerationConfig
from difuse.runtime.decoders import make_decoder
from difuse.runtime.kv_cache import CachePolicy, StaticKVCache, StepKind, block_causal_bias_into
from difuse.runtime.step import make_denoise_step


def check_iteration(model, config: GenerationConfig, warn: bool = True) -> None:
    """Block diffusion's block-causal attention is only right for models trained with it; the
    other way round works, but attends where the model never learned to (a warning, if `warn`)."""
    block_causal = getattr(model, "BLOCK_CAUSAL", False)
    if config.iteration == "block_diffusion" and not block_causal:
        raise ValueError(f"iteration='block_diffusion' needs a model trained with block-causal attention "
                         f"(LLaDA2); {type(model).__name__} is bidirectional: use iteration='blockwise'")
    if warn and block_causal and config.iteration != "block_diffusion":
        warnings.warn(f"{type(model).__name__} was trained with block-causal attention; iteration="
                      f"{config.iteration!r} lets every position see later blocks. Use iteration='block_diffusion', "
                      "cache='prefix' for the model's own decoding.", stacklevel=2)


class Workspace:
    def __init__(self, model, config: GenerationConfig, batch: int, length: int, device, dtype,
                 scheduler=None, use_cuda_graph: bool = False, graph_pool=None):
        check_iteration(model, config, warn=False)  # Engine.generate and BlockBatcher.submit warn
        model_config = model.config
        self.model, self.batch, self.length = model, batch, length
        self.block_length = config.block_length
        self.mask_id, self.eos_id = model_config.mask_token_id, model_config.eos_token_id
        self.policy = CachePolicy(config)
        self.decoder = make_decoder(config, self.mask_id)
        self.smooth = config.iteration == "smooth"
        # block diffusion: each step kind gets its own [B, 1, T, L] bias (key padding + block-causal)
        self.block_causal = config.iteration == "block_diffusion"
        self.scheduler, self.use_cuda_graph, self.graph_pool = scheduler, use_cuda_graph, graph_pool
        self.device = device

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens, self.positions = zeros(batch, length), zeros(batch, length)
        self.key_bias = zeros(batch, 1, 1, length, dtype=dtype)
        self.block_rows = zeros(config.block_length)
        self.threshold = torch.tensor(config.threshold, dtype=torch.float32, device=device)
        self.low_threshold = torch.tensor(config.low_threshold, dtype=torch.float32, device=device)
        self.steps_taken, self.committed = zeros(batch), zeros(batch)
        self.state = self.decoder.init_state(batch, config.block_length, model.vocab_size, device)
        self.smooth_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.soft_embeds = zeros(batch, config.block_length, model.hidden_size, dtype=torch.float32)
        self.cache = None
        if config.cache != "none":
            self.cache = StaticKVCache(model.num_layers, batch, model.num_kv_heads, length, model.head_dim,
                                       dtype, device)
        self._arange = torch.arange(length, device=device)
        self._runners: dict[tuple[str, int], tuple[StepRunner, torch.Tensor, torch.Tensor]] = {}
        self._step_biases: dict[str, torch.Tensor] = {}  # block diffusion: runner -> its [B, 1, T, L] bias
        self._placed: dict[str, tuple[int, int]] = {}  # runner -> (query start, block start) its rows hold

    def configure(self, config: GenerationConfig) -> None:
        """Settings that change no shape or recording: thresholds and the cache policy's window."""
        self.policy = CachePolicy(config)
        self.threshold.fill_(config.threshold)
        self.low_threshold.fill_(config.low_threshold)

    def load(self, tokens: torch.Tensor, positions: torch.Tensor, key_bias: torch.Tensor,
             steps_taken: torch.Tensor, committed: torch.Tensor) -> None:
        for mine, theirs in ((self.tokens, tokens), (self.positions, positions), (self.key_bias, key_bias),
                             (self.steps_taken, steps_taken), (self.committed, committed)):
            mine.copy_(theirs)
        self._placed.clear()  # block-causal biases derive from the key bias just loaded

    def prefill(self, prefix_length: int) -> None:
        """Block diffusion: write the K/V of the columns [0, prefix_length) (whole blocks) once."""
        rows = self._arange[:prefix_length]
        bias = torch.empty(self.batch, 1, prefix_length, self.length, dtype=self.key_bias.dtype, device=self.device)
        block_causal_bias_into(bias, self.key_bias, rows, self.block_length)
        self.cache.bind(rows, bias)
        self.model.forward(self.tokens[:, :prefix_length], self.positions[:, :prefix_length], cache=self.cache)

    def load_cache(self, other: Workspace, kept: torch.Tensor) -> None:
        """Take the K/V of rows `kept` of another workspace's cache (the batch shrank)."""
        for mine, theirs in zip(self.cache.keys + self.cache.values, other.cache.keys + other.cache.values):
            torch.index_select(theirs, 0, kept, out=mine)

    def start_block(self, block_start: int) -> None:
        torch.add(self._arange[: self.block_length], block_start, out=self.block_rows)
        self.decoder.start_block(self.state, self.tokens[:, block_start:block_start + self.block_length])
        self.soft_embeds.zero_()

    def run_step(self, kind: StepKind, block_start: int) -> None:
        runner, query_rows, block_in_query = self._runner(kind)
        if self._placed.get(runner.name) != (kind.start, block_start):  # rows move once per block, not per step
            torch.add(self._arange[: kind.length], kind.start, out=query_rows)
            torch.add(self._arange[: self.block_length], block_start - kind.start, out=block_in_query)
            if self.block_causal:
                block_causal_bias_into(self._step_biases[runner.name], self.key_bias, query_rows, self.block_length)
            self._placed[runner.name] = (kind.start, block_start)
        runner()

    def masks_left(self, block_start: int) -> int:
        """Host sync: the most masks any row still has in the block."""
        block = self.tokens[:, block_start:block_start + self.block_length]
        return int((block == self.mask_id).sum(dim=-1).max())

    def _runner(self, kind: StepKind):
        key = (kind.name, kind.length)
        if key not in self._runners:
            query_rows = torch.zeros(kind.length, dtype=torch.int64, device=self.device)
            block_in_query = torch.zeros(self.block_length, dtype=torch.int64, device=self.device)
            bias = self.key_bias
            if self.block_causal:
                bias = torch.zeros(self.batch, 1, kind.length, self.length, dtype=self.key_bias.dtype,
                                   device=self.device)
            state_names = tuple(sorted(self.state))
            fn = make_denoise_step(self.model, self.decoder, self.cache if kind.cached else None,
                                   state_names, self.smooth)
            args = (self.tokens, self.positions, bias, query_rows, block_in_query, self.block_rows,
                    self.threshold, self.low_threshold, self.steps_taken, self.committed,
                    *(self.state[name] for name in state_names))
            if self.smooth:
                args += (self.smooth_weight, self.soft_embeds)
            runner = StepRunner(f"{kind.name}[B={self.batch}, T={kind.length}]", fn, args, self.scheduler,
                                self.use_cuda_graph, self.graph_pool)
            if self.block_causal:
                self._step_biases[runner.name] = bias
            self._runners[key] = (runner, query_rows, block_in_query)
        return self._runners[key]

    @property
    def runners(self) -> list[StepRunner]:
        return [runner for runner, _, _ in self._runners.values()]
