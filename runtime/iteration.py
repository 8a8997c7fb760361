"""Iteration management: how the steps of one block are issued and when the host looks.

Block-wise: the block's steps run until it has no masks left. The host checks "masks left" (the
one sync of the loop) only every k steps (loop unrolling); steps issued after a block finished
are no-ops, since a step with no masked position commits nothing. The fixed schedule knows its
step count and never checks. Iteration smoothing (dInfer's soft diffusion iteration) feeds the
block's still-masked rows E[mask] + w * E_softmax[embedding] and lowers the threshold from 1
towards the configured one; both schedules run on the generation's global step counter.
Block diffusion runs this same loop: its policy makes a block's first step the [previous block |
block] step that writes the previous block's final K/V (runtime/kv_cache.py).
Early stop: a finished block that holds EOS ends its row (everything after becomes EOS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difuse.runtime.config import GenerationConfig
from difuse.runtime.workspace import Workspace


@dataclass
class BlockStats:
    forwards: int = 0
    refreshes: int = 0


def unroll_count(config: GenerationConfig, masks_left: int) -> int:
    if config.unroll is not None:
        return config.unroll
    return max(1, min(masks_left // config.expected_tokens_per_step, config.max_unroll))


def smoothing_schedule(config: GenerationConfig, step: int) -> tuple[float, float]:
    """(soft-embedding weight, threshold) for global step `step` of iteration smoothing."""
    weight = min(config.smooth_weight_init + config.smooth_weight_growth * step, config.smooth_weight)
    threshold = max(1.0 - config.smooth_threshold_decay * step, config.threshold)
    return weight, threshold


def run_block(workspace: Workspace, config: GenerationConfig, block_start: int, global_step: int,
              stats: BlockStats) -> int:
    """Decode the block at `block_start` until no masks are left; returns the new global step."""
    workspace.start_block(block_start)
    fixed_steps = config.steps_per_block
    step_in_block, masks_left = 0, config.block_length
    while True:
        count = fixed_steps if fixed_steps is not None else unroll_count(config, masks_left)
        for _ in range(count):
            if config.iteration == "smooth":
                weight, threshold = smoothing_schedule(config, global_step)
                workspace.smooth_weight.fill_(weight)
                workspace.threshold.fill_(threshold)
            stats.refreshes += workspace.policy.is_refresh(step_in_block)
            kind = workspace.policy.step_kind(step_in_block, block_start, workspace.length)
            workspace.run_step(kind, block_start)
            step_in_block += 1
            global_step += 1
            stats.forwards += 1
        if fixed_steps is not None:
            return global_step
        masks_left = workspace.masks_left(block_start)
        if masks_left == 0:
            return global_step


def rows_ending_at(tokens: torch.Tensor, block_start: int, block_end: int, eos_id: int,
                   gen_starts: torch.Tensor) -> torch.Tensor:
    """Early stop: rows whose block [block_start, block_end) holds EOS among their generated
    columns (from gen_starts [B] on; a block-diffusion block can begin with prompt tokens) get EOS
    after it, in place. Returns the bool mask [B] of those rows (host copy: one sync per block)."""
    columns = torch.arange(block_start, block_end, device=tokens.device)
    generated = columns[None, :] >= gen_starts[:, None]
    ended = ((tokens[:, block_start:block_end] == eos_id) & generated).any(dim=-1)
    tokens[:, block_end:].masked_fill_(ended.unsqueeze(-1), eos_id)
    return ended.cpu()
