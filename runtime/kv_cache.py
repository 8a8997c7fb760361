"""KV caches for bidirectional dLLMs (Fast-dLLM prefix / dual cache, dInfer's vicinity window).

One static buffer pair [B, H_kv, L, D] per layer holds the post-RoPE keys and values of every
position of the sequence (prompt | generation). A step computes a contiguous run of query rows;
each attention layer writes that run's K/V into the buffers in place (index_copy_ at the step's
row tensor) and attends over all L rows. Which rows a step recomputes is the whole difference
between the modes:

    refresh (every mode, at block start and every `refresh_every` steps): all L rows
    prefix:   the block and everything after it   [block_start, L)
    dual:     the block only                      [block_start, block_end)
    vicinity: the block with `prefix_look` rows before and `after_look` after, clamped to [0, L)
    none:     no cache; every step is a full forward

    block_causal (iteration='block_diffusion', block-causal models): EXACT prefix cache. The
              prompt's whole blocks are prefilled once; a block's first step computes
              [previous block | block] (2N rows: the previous block's rows, now final, write
              their clean K/V), its other steps the block only (N rows). Each query row attends
              to keys before the end of its own block (`block_causal_bias_into`), so cached rows
              are exactly what a full block-causal forward would compute: nothing later can
              change them.

Rows not recomputed keep the K/V of the last step that computed them (stale inside the block:
the approximation Fast-dLLM and dInfer make). Shapes never change during a generation: the row
tensors are updated in place, and the only mask is the padding key bias, so one captured
graph serves every block of a (batch, length, step kind).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difuse.runtime.config import GenerationConfig


def key_padding_bias(pad_lengths: torch.Tensor, length: int, dtype: torch.dtype,
                     ends: torch.Tensor | None = None) -> torch.Tensor:
    """pad_lengths (and ends): int64 [B] -> additive bias [B, 1, 1, L]: the most negative finite
    value on the left-padding keys (and on the right padding from `ends` on), finite so no softmax
    row can become NaN; 0 elsewhere."""
    columns = torch.arange(length, device=pad_lengths.device).unsqueeze(0)
    padded = columns < pad_lengths.unsqueeze(1)  # [B, L]
    if ends is not None:
        padded |= columns >= ends.unsqueeze(1)
    bias = torch.zeros(padded.shape, dtype=dtype, device=pad_lengths.device)
    bias.masked_fill_(padded, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def block_causal_bias_into(out: torch.Tensor, key_bias: torch.Tensor, query_rows: torch.Tensor,
                           block_length: int) -> None:
    """out [B, 1, T, L] <- key_bias [B, 1, 1, L] where key column < end of the query row's block
    (blocks of `block_length` columns from column 0), the most negative finite value elsewhere."""
    columns = torch.arange(out.shape[-1], device=out.device)
    visible_end = (query_rows // block_length + 1) * block_length  # [T]
    hidden = columns.unsqueeze(0) >= visible_end.unsqueeze(1)  # [T, L]
    out.copy_(key_bias.masked_fill(hidden[None, None], torch.finfo(out.dtype).min))


class StaticKVCache:
    """Per-layer K/V buffers written in place. The step binds the rows it computes and the key
    bias before the forward; each layer's `update` writes its new K/V there and returns the
    full buffers, which is what the model attends over."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rows: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def bind(self, rows: torch.Tensor, bias: torch.Tensor) -> None:
        self.rows, self.bias = rows, bias

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, H_kv, T, D] for the bound rows (T == len(rows))."""
        if self.rows is None or k.shape[2] != self.rows.shape[0]:
            raise ValueError(f"cache update of {k.shape[2]} rows, but {None if self.rows is None else len(self.rows)} "
                             "rows are bound: call bind(rows, bias) before the forward")
        keys, values = self.keys[layer_index], self.values[layer_index]
        keys.index_copy_(2, self.rows, k.to(keys.dtype))
        values.index_copy_(2, self.rows, v.to(values.dtype))
        return keys, values, self.bias


@dataclass(frozen=True)
class StepKind:
    """A step's query rows [start, start + length) of the sequence, and whether the step runs
    against the cache (writing those rows) or without one (every row, plain attention)."""

    name: str
    start: int
    length: int
    cached: bool


class CachePolicy:
    """Which rows each step recomputes and when the whole cache is refreshed."""

    def __init__(self, config: GenerationConfig):
        self.mode = "block_causal" if config.iteration == "block_diffusion" else config.cache
        self.block_length = config.block_length
        self.prefix_look, self.after_look = config.prefix_look, config.after_look
        self.refresh_every = config.refresh_every

    def is_refresh(self, step_in_block: int) -> bool:
        if self.mode in ("none", "block_causal"):
            return False
        return step_in_block == 0 or (self.refresh_every is not None and step_in_block % self.refresh_every == 0)

    def step_kind(self, step_in_block: int, block_start: int, length: int) -> StepKind:
        if self.mode == "none":
            return StepKind("full", 0, length, cached=False)
        if self.mode == "block_causal":
            if step_in_block == 0 and block_start > 0:  # block 0 has no previous block to finalise
                return StepKind("block_pair", block_start - self.block_length, 2 * self.block_length, cached=True)
            return StepKind("block", block_start, self.block_length, cached=True)
        if self.is_refresh(step_in_block):
            return StepKind("refresh", 0, length, cached=True)
        if self.mode == "prefix":
            return StepKind(f"prefix{length - block_start}", block_start, length - block_start, cached=True)
        if self.mode == "dual":
            return StepKind("dual", block_start, self.block_length, cached=True)
        window = min(self.prefix_look + self.block_length + self.after_look, length)
        start = min(max(block_start - self.prefix_look, 0), length - window)
        return StepKind("vicinity", start, window, cached=True)
