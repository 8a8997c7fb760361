"""Engine: prompts in, generations out, through the block-diffusion loop.

    prompts -> token ids -> left-padded batch [pad | prompt | MASK * gen_length]
    for each block: run_block (steps: forward + LM head on the block + decoder, in place)
                    early stop: rows whose block holds EOS end there and leave the batch
    -> detokenize, per-sequence stats

Left padding keeps the generation blocks of every row at the same columns (runtime/layout.py);
the padding keys are masked by an additive bias and each row's positions start at its first real
token, so a padded row computes what it would alone. Prompts are sorted by length before they are
split into batches of `batch_size`, which keeps padding small; results come back in the caller's
order.

iteration='block_diffusion' (block-causal models: LLaDA2) decodes on the model's own block grid,
counted from each row's first token: the block that holds the prompt's tail is the first one
decoded. The prompt's whole blocks are prefilled once and each block is decoded against that
exact prefix cache (runtime/kv_cache.py, mode block_causal).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from difuse.runtime.config import GenerationConfig
from difuse.runtime.iteration import BlockStats, rows_ending_at, run_block
from difuse.runtime.layout import lay_out
from difuse.runtime.workspace import Workspace, check_iteration


@dataclass
class Result:
    text: str
    tokens: list[int]  # generated ids before the first EOS
    sequence: list[int]  # the whole generated region (gen_length ids, EOS-filled after an early stop)
    steps: int  # denoise steps that still had masks to decode in this sequence's block
    tokens_per_step: float
    # wall time of the batch's steps while this sequence was in it; a shape bucket's first use also
    # pays its recording, kernel compilation and graph capture, so time a second call
    ms_per_step: float
    cache_refreshes: int


@dataclass
class _Finished:
    sequence: list[int]
    steps: int
    committed: int
    forwards: int
    refreshes: int
    elapsed_ms: float


class Engine:
    def __init__(self, model, tokenizer=None, enable_fusion: bool = True, cuda_graphs: bool = True,
                 fusion_config=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.enable_fusion = enable_fusion
        self.scheduler = None
        if enable_fusion:
            from difuse.fusion import FusionConfig, FusionScheduler

            self.scheduler = FusionScheduler(fusion_config or FusionConfig())
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._workspaces: dict[tuple, Workspace] = {}
        self.last_stats: dict = {}

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
                        enable_fusion: bool = True, cuda_graphs: bool = True, tensor_parallel: int = 1,
                        expert_parallel: int = 1) -> "Engine":
        """tensor_parallel / expert_parallel: 1 or the number of processes torchrun started (each
        process then holds its shard of the model and all of them generate the same tokens)."""
        from difuse.models import default_model_path, load_model, load_tokenizer

        path = path if path is not None else default_model_path()
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        # --- tensor / expert parallelism (models/parallel.py) ---
        parallel = None
        if tensor_parallel != 1 or expert_parallel != 1:
            from difuse.models.parallel import ParallelConfig, init_distributed

            device = init_distributed(device)
            parallel = ParallelConfig.from_sizes(tensor_parallel, expert_parallel)
        # --- end tensor / expert parallelism ---
        return cls(load_model(path, device, dtype, parallel), load_tokenizer(path), enable_fusion, cuda_graphs)

    def encode(self, prompt: str | list[int], chat: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists or load one")
            from difuse.models import encode_prompt

            return list(encode_prompt(self.tokenizer, prompt, chat=chat))
        ids = [int(t) for t in prompt]
        vocab = self.model.vocab_size
        if not ids or not all(0 <= t < vocab for t in ids):
            raise ValueError(f"a prompt must be a non-empty list of token ids in [0, {vocab})")
        return ids

    # no_grad, not inference_mode: under inference_mode the dispatcher keeps composite ops such as
    # aten.to / softmax.int undecomposed, and the recorded step no longer has the forms the
    # fusion pattern matchers recognise
    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], config: GenerationConfig | None = None,
                 chat: bool = True) -> list[Result]:
        config = config or GenerationConfig()
        check_iteration(self.model, config)
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        if config.seed is not None:
            torch.manual_seed(config.seed)
        encoded = [self.encode(p, chat) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Result | None] = [None] * len(encoded)
        self.last_stats = {"forwards": 0, "cache_refreshes": 0, "wall_ms": 0.0, "batches": 0}
        for first in range(0, len(order), config.batch_size):
            chunk = order[first:first + config.batch_size]
            for index, result in zip(chunk, self._generate_batch([encoded[i] for i in chunk], config)):
                results[index] = result
        self.last_stats["graph_capture_errors"] = {
            r.name: r.capture_error for w in self._workspaces.values() for r in w.runners if r.capture_error}
        return results

    def _generate_batch(self, prompts: list[list[int]], config: GenerationConfig) -> list[Result]:
        model_config, n = self.model.config, config.block_length
        limit = getattr(model_config, "max_sequence_length", None) or getattr(model_config, "max_position_embeddings",
                                                                              None)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest + config.gen_length > limit:  # padding takes no positions
            raise ValueError(f"prompt ({longest} tokens) + gen_length {config.gen_length} exceeds the model's maximum "
                             f"sequence length {limit}")
        layout = lay_out(prompts, [config.gen_length] * len(prompts), config, model_config, self.dtype)
        length = layout.length
        gen_starts = torch.tensor(layout.gen_starts, device=self.device)
        counters = torch.zeros(2, len(prompts), dtype=torch.int64, device=self.device)
        workspace = self._workspace(config, len(prompts), length)
        workspace.load(layout.tokens.to(self.device), layout.positions.to(self.device),
                       layout.key_bias.to(self.device), counters[0], counters[1])
        if workspace.block_causal and layout.first_block:
            workspace.prefill(layout.first_block)
        rows = list(range(len(prompts)))  # workspace row -> batch index
        finished: dict[int, _Finished] = {}
        stats, global_step, start = BlockStats(), 0, time.perf_counter()
        for block_start in range(layout.first_block, length, n):
            global_step = run_block(workspace, config, block_start, global_step, stats)
            if not config.early_stop or block_start + n == length:
                continue
            ended = rows_ending_at(workspace.tokens, block_start, block_start + n, workspace.eos_id, gen_starts)
            if not ended.any():
                continue
            self._retire(workspace, rows, ended, finished, stats, start, gen_starts, config.gen_length)
            keep = (~ended).nonzero().flatten().tolist()
            rows = [rows[i] for i in keep]
            if not rows:
                break
            kept = torch.tensor(keep, device=self.device)
            gen_starts = gen_starts.index_select(0, kept)
            smaller = self._workspace(config, len(rows), length)
            smaller.load(*(t.index_select(0, kept) for t in (workspace.tokens, workspace.positions, workspace.key_bias,
                                                              workspace.steps_taken, workspace.committed)))
            if smaller.block_causal:  # the exact prefix cache is never refreshed: carry it over
                smaller.load_cache(workspace, kept)
            workspace = smaller
        if rows:
            self._retire(workspace, rows, torch.ones(len(rows), dtype=torch.bool), finished, stats, start, gen_starts,
                         config.gen_length)
        self.last_stats["forwards"] += stats.forwards
        self.last_stats["cache_refreshes"] += stats.refreshes
        self.last_stats["wall_ms"] += (time.perf_counter() - start) * 1e3
        self.last_stats["batches"] += 1
        return [self._result(finished[i]) for i in range(len(prompts))]

    def _retire(self, workspace, rows, ended, finished, stats, start, gen_starts, gen_length):
        if workspace.device.type == "cuda":
            torch.cuda.synchronize(workspace.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        starts = gen_starts.tolist()
        first = min(starts)  # the host copy skips the prompt columns every row has
        tokens = workspace.tokens[:, first:].tolist()
        steps, committed = workspace.steps_taken.tolist(), workspace.committed.tolist()
        for i in ended.nonzero().flatten().tolist():
            sequence = tokens[i][starts[i] - first:starts[i] - first + gen_length]
            finished[rows[i]] = _Finished(sequence, steps[i], committed[i], stats.forwards, stats.refreshes,
                                          elapsed_ms)

    def _result(self, done: _Finished) -> Result:
        eos = self.model.config.eos_token_id
        answer = done.sequence[:done.sequence.index(eos)] if eos in done.sequence else done.sequence
        text = self.tokenizer.decode(answer, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Result(text=text, tokens=answer, sequence=done.sequence, steps=done.steps,
                      tokens_per_step=done.committed / max(done.steps, 1),
                      ms_per_step=done.elapsed_ms / max(done.forwards, 1), cache_refreshes=done.refreshes)

    def _workspace(self, config: GenerationConfig, batch: int, length: int) -> Workspace:
        structure = (batch, length, config.block_length, config.decoder, config.steps_per_block, config.temperature,
                     config.credit_alpha, config.credit_gamma, config.credit_beta, config.cache, config.iteration)
        if structure not in self._workspaces:
            self._workspaces[structure] = Workspace(self.model, config, batch, length, self.device, self.dtype,
                                                    self.scheduler, self.cuda_graphs, self.graph_pool)
        workspace = self._workspaces[structure]
        workspace.configure(config)
        return workspace

    def fusion_report(self):
        if self.scheduler is None:
            raise ValueError("fusion is disabled on this engine (enable_fusion=False): there is nothing to report")
        return self.scheduler.report()
