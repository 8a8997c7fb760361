"""Where the rows of a batch sit in the static token buffer, shared by Engine and BlockBatcher.

    row r:  [left pad | prefix_r | MASK ... | right pad]
             keys masked          ^ gen_start_r  ^ end_r: keys masked from here

Blocks of `block_length` columns are decoded from column `first_block` to `length`; positions
count from each row's first real token and the key bias hides both pads, so a padded row computes
what it would alone.

Bidirectional models: every prefix ends at `first_block`, so each row's generation starts on a
block of its own and fills whole blocks.

Block diffusion (block-causal models, LLaDA2): the model was trained on a grid of blocks counted
from each sequence's first token, and LLaDA2's own generate() decodes on that grid. The block
holding the prefix's last tokens is the first one decoded (its prefix columns stay as they are,
only its masked columns are decoded), and the last block runs past the requested length to the
grid's end: those extra columns are decoded, since they share a block with the last requested
tokens and the model sees them as masks there, but they are not returned. Left pads are whole
blocks, so every row's grid falls on the same columns; `first_block` stays a multiple of
lcm(prompt_multiple, block_length), so a prompt length maps to few buffer shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difuse.runtime.config import GenerationConfig
from difuse.runtime.kv_cache import key_padding_bias


@dataclass
class Layout:
    tokens: torch.Tensor  # int64 [B, L]
    positions: torch.Tensor  # int64 [B, L]
    key_bias: torch.Tensor  # [B, 1, 1, L]: 0 on real columns, the most negative finite value on pads
    gen_starts: list[int]  # column of each row's first generated token
    first_block: int  # column of the first block decoded; every earlier column is prefix or pad

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def lay_out(prefixes: list[list[int]], remaining: list[int], config: GenerationConfig, model_config,
            dtype: torch.dtype) -> Layout:
    """prefixes: each row's prompt and committed tokens; remaining: tokens each row still wants.
    Pads are the model's pad token (EOS without one); keys there are masked whatever they hold."""
    pad = getattr(model_config, "pad_token_id", None)
    pad_id = pad if pad is not None else model_config.eos_token_id
    n = config.block_length
    if config.iteration == "block_diffusion":
        grid = math.lcm(config.prompt_multiple, n)
        whole = [len(p) // n * n for p in prefixes]  # each prefix's whole blocks
        first_block = -(-max(whole) // grid) * grid
        pads = [first_block - w for w in whole]
        ends = [pad + -(-(len(p) + m) // n) * n for pad, p, m in zip(pads, prefixes, remaining)]
    else:
        first_block = -(-max(len(p) for p in prefixes) // config.prompt_multiple) * config.prompt_multiple
        pads = [first_block - len(p) for p in prefixes]
        ends = [first_block + m for m in remaining]
    length = max(ends)
    tokens = torch.full((len(prefixes), length), pad_id, dtype=torch.int64)
    gen_starts = []
    for row, (prefix, pad, end) in enumerate(zip(prefixes, pads, ends)):
        gen_start = pad + len(prefix)
        tokens[row, pad:gen_start] = torch.tensor(prefix, dtype=torch.int64)
        tokens[row, gen_start:end] = model_config.mask_token_id
        gen_starts.append(gen_start)
    pads, ends = torch.tensor(pads), torch.tensor(ends)
    positions = (torch.arange(length) - pads[:, None]).clamp(min=0)
    return Layout(tokens, positions, key_padding_bias(pads, length, dtype, ends), gen_starts, first_block)
