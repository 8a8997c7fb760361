"""Dynamic (block-level continuous) batching over the engine's public pieces.

A running batch ("group") holds sequences that share every generation setting that a step bakes
in (decoder, threshold, cache mode, block length, ...). Sequences join a group and leave it only
at block boundaries. Rows of one group sit at different points of their generations, so the
group lays its rows out with the *current* block of every row at the same columns:

    row i:  [left pad | prompt_i + committed blocks_i | current block | later blocks_i | right pad]
            ^ keys masked                              ^ block_start                   ^ keys masked

Positions count from each row's first real token and the key bias masks both pads, so a row
computes what it would alone: attention is bidirectional, permutation-equivariant under RoPE
positions, and masked keys add exact zeros. Every cache mode refreshes the whole cache at a
block's first step and every decoder resets its state per block, which is why a group may be
re-laid out (new workspace, new rows) between blocks without changing any row's tokens.

The layout is rebuilt only when rows join or leave; otherwise the group keeps its workspace and
moves `block_start` one block right, exactly like Engine.generate.

iteration='block_diffusion' keeps every row on the model's block grid (runtime/layout.py): left
pads are whole blocks, a row's first block may begin with its prompt's tail, and a new layout
prefills its exact prefix cache (each row's prompt and committed blocks) before the next block.
Two settings tie a row's result to the batch it runs in and are served conservatively:
iteration='smooth' follows the generation's global step (its rows join only a group that has
not started), and cache='vicinity' recomputes a column window clamped at the sequence ends (its
rows run one per group).

This class is not thread-safe except for `submit` and `Sequence.cancel`; one worker thread
calls `step`.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from difuse.runtime.config import GenerationConfig
from difuse.runtime.iteration import BlockStats, run_block
from difuse.runtime.layout import lay_out
from difuse.runtime.workspace import Workspace, check_iteration

# settings that never enter a step: they may differ inside one group (the fixed schedule's
# `steps` counts the whole generation; its steps per block are what a block runs)
_PER_ROW_SETTINGS = ("gen_length", "steps", "early_stop", "batch_size", "seed")


class QueueFull(RuntimeError):
    pass


@dataclass
class BlockEvent:
    """What one block boundary tells the sequence's owner. `tokens` are the ids the block
    committed; `finish_reason` is set on the last event ("stop": EOS, "length": gen_length
    reached, "timeout", "cancelled")."""

    tokens: list[int]
    finish_reason: str | None = None


@dataclass
class Sequence:
    prompt: list[int]
    config: GenerationConfig
    on_event: Callable[["Sequence", BlockEvent], None] = lambda sequence, event: None
    deadline: float | None = None  # time.monotonic() after which the sequence is dropped
    generated: list[int] = field(default_factory=list)  # committed blocks (EOS included)
    steps: int = 0  # denoise steps that still had masks in this sequence's block
    committed: int = 0
    finish_reason: str | None = None
    id: int = field(default_factory=itertools.count().__next__)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Thread-safe: the worker drops the sequence at the next block boundary."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def remaining(self) -> int:
        return self.config.gen_length - len(self.generated)


@dataclass
class StepStats:
    """Counters of one `step()` call, for metrics."""

    blocks: int = 0
    forwards: int = 0
    block_seconds: list[float] = field(default_factory=list)  # per block run: wall time / forwards
    committed_tokens: int = 0


def group_key(config: GenerationConfig) -> tuple:
    values = dataclasses.asdict(config)
    shared = sorted((k, v) for k, v in values.items() if k not in _PER_ROW_SETTINGS)
    return tuple(shared) + (("steps_per_block", config.steps_per_block),)


class _Group:
    def __init__(self, config: GenerationConfig):
        self.config = config  # the group's step settings (per-row settings come from each row)
        self.rows: list[Sequence] = []
        self.workspace: Workspace | None = None
        self.block_start = 0
        self.gen_starts: list[int] = []  # per row: the column its generation starts at
        self.global_step = 0
        self.stale = True  # rows joined or left: the layout must be rebuilt before the next block


class BlockBatcher:
    def __init__(self, engine, max_batch_size: int = 16, max_queue: int = 64, max_workspaces: int = 8):
        if max_batch_size < 1 or max_queue < 1 or max_workspaces < 1:
            raise ValueError("max_batch_size, max_queue and max_workspaces must be >= 1, got "
                             f"{max_batch_size}, {max_queue}, {max_workspaces}")
        self.engine = engine
        self.max_batch_size, self.max_queue, self.max_workspaces = max_batch_size, max_queue, max_workspaces
        model_config = engine.model.config
        self.eos_id = model_config.eos_token_id
        self._pending: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._groups: dict[tuple, _Group] = {}
        self._workspaces: OrderedDict[tuple, Workspace] = OrderedDict()  # LRU over (batch, length, settings)

    # -- thread-safe side ------------------------------------------------------------------
    def submit(self, sequence: Sequence) -> None:
        if sequence.remaining <= 0 or not sequence.prompt:
            raise ValueError("a sequence needs a non-empty prompt and gen_length > 0")
        check_iteration(self.engine.model, sequence.config)
        with self._lock:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._pending.append(sequence)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self._groups.values())

    def idle(self) -> bool:
        return not self._groups and self.queue_depth == 0

    # -- worker side -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepStats:
        """Admit waiting sequences, then run one block of every running group."""
        stats = StepStats()
        self._admit()
        for key in list(self._groups):
            group = self._groups[key]
            self._drop_cancelled(group)
            if not group.rows:
                del self._groups[key]
                continue
            self._run_block(group, stats)
            if not group.rows:
                del self._groups[key]
        return stats

    def abort(self, reason: str = "error") -> None:
        """End every running and waiting sequence (after a step failed: its rows' state is unknown)."""
        with self._lock:
            waiting, self._pending = list(self._pending), deque()
        running = [s for group in self._groups.values() for s in group.rows]
        self._groups.clear()
        for sequence in running + waiting:
            self._finish(sequence, [], reason)

    def _admit(self) -> None:
        now = time.monotonic()
        with self._lock:
            waiting, self._pending = self._pending, deque()
        kept: deque[Sequence] = deque()
        for sequence in waiting:
            if sequence.cancelled or (sequence.deadline is not None and now > sequence.deadline):
                self._finish(sequence, [], "cancelled" if sequence.cancelled else "timeout")
                continue
            key = group_key(sequence.config)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(sequence.config)
            if self._accepts(group):
                group.rows.append(sequence)
                group.stale = True
            else:
                kept.append(sequence)
        with self._lock:
            self._pending = kept + self._pending  # arrivals during admission stay behind the old ones

    def _accepts(self, group: _Group) -> bool:
        config = group.config
        if config.cache == "vicinity":
            return not group.rows
        if config.iteration == "smooth" and group.global_step > 0:
            return False
        return len(group.rows) < self.max_batch_size

    def _drop_cancelled(self, group: _Group) -> None:
        now = time.monotonic()
        for sequence in list(group.rows):
            expired = sequence.deadline is not None and now > sequence.deadline
            if sequence.cancelled or expired:
                group.rows.remove(sequence)
                group.stale = True
                self._finish(sequence, [], "cancelled" if sequence.cancelled else "timeout")

    def _run_block(self, group: _Group, stats: StepStats) -> None:
        config, n = group.config, group.config.block_length
        if group.stale:
            self._lay_out(group)
        workspace, block_start = group.workspace, group.block_start
        block_stats, start = BlockStats(), time.perf_counter()
        group.global_step = run_block(workspace, config, block_start, group.global_step, block_stats)
        blocks = workspace.tokens[:, block_start:block_start + n].tolist()  # host sync: one per block
        # a row's generated tokens of this block: not the prompt tail a block-diffusion block may
        # begin with, nor the columns past gen_length its last block decodes
        blocks = [block[max(start - block_start, 0):][:sequence.remaining]
                  for block, start, sequence in zip(blocks, group.gen_starts, group.rows)]
        steps, committed = workspace.steps_taken.tolist(), workspace.committed.tolist()
        elapsed = time.perf_counter() - start
        stats.blocks += 1
        stats.forwards += block_stats.forwards
        stats.block_seconds.append(elapsed / max(block_stats.forwards, 1))
        leaving = []
        for row, sequence in enumerate(group.rows):
            stats.committed_tokens += committed[row] - sequence.committed
            sequence.generated += blocks[row]
            sequence.steps, sequence.committed = steps[row], committed[row]
            reason = None
            if sequence.config.early_stop and self.eos_id in blocks[row]:
                reason = "stop"
            elif sequence.remaining == 0:
                reason = "stop" if self.eos_id in sequence.generated else "length"
            if reason is None:
                sequence.on_event(sequence, BlockEvent(blocks[row]))
            else:
                leaving.append(sequence)
                self._finish(sequence, blocks[row], reason)
        if leaving:
            group.rows = [s for s in group.rows if s not in leaving]
            group.stale = True
        group.block_start += n

    def _lay_out(self, group: _Group) -> None:
        """A fresh layout with every row's next block at the same columns (runtime/layout.py)."""
        config, rows = group.config, group.rows
        layout = lay_out([s.prompt + s.generated for s in rows], [s.remaining for s in rows], config,
                         self.engine.model.config, self.engine.dtype)
        counters = torch.tensor([[s.steps for s in rows], [s.committed for s in rows]], dtype=torch.int64)
        workspace = self._workspace(config, len(rows), layout.length)
        device = self.engine.device
        workspace.load(layout.tokens.to(device), layout.positions.to(device), layout.key_bias.to(device),
                       counters[0].to(device), counters[1].to(device))
        if workspace.block_causal and layout.first_block:  # the exact prefix cache of the new layout
            workspace.prefill(layout.first_block)
        group.workspace, group.block_start, group.stale = workspace, layout.first_block, False
        group.gen_starts = layout.gen_starts

    def _workspace(self, config: GenerationConfig, batch: int, length: int) -> Workspace:
        key = (batch, length, group_key(config))
        workspace = self._workspaces.pop(key, None)
        if workspace is None:
            engine = self.engine
            workspace = Workspace(engine.model, config, batch, length, engine.device, engine.dtype,
                                  engine.scheduler, engine.cuda_graphs, engine.graph_pool)
            while len(self._workspaces) >= self.max_workspaces:
                self._workspaces.popitem(last=False)
        self._workspaces[key] = workspace
        workspace.configure(config)
        return workspace

    @staticmethod
    def _finish(sequence: Sequence, tokens: list[int], reason: str) -> None:
        sequence.finish_reason = reason
        sequence.on_event(sequence, BlockEvent(tokens, reason))
