"""The denoise step: one function of tensors that the runtime runs eagerly, records and fuses,
or captures in a CUDA graph.

    forward over the step's query rows (KV cache: write those rows, attend over all)
    -> LM head on the active block's rows only -> decoder (confidence selection)
    -> committed tokens written into the sequence in place

Everything that changes between steps or blocks is an argument tensor updated in place (rows,
thresholds, decoder state), never a Python value baked into the recording.
"""
from __future__ import annotations

import torch

from difuse.runtime.decoders import Decoder
from difuse.runtime.kv_cache import StaticKVCache

# argument order of every denoise step; decoder state tensors follow, then the smoothing pair
STEP_ARGS = ("tokens", "positions", "key_bias", "query_rows", "block_in_query", "block_rows",
             "threshold", "low_threshold", "steps_taken", "committed")
SMOOTH_ARGS = ("smooth_weight", "soft_embeds")


def embedding_matrix(model) -> torch.Tensor:
    """The input embedding table [V, H] (for iteration smoothing's expected embeddings)."""
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if len(tables) != 1:
        raise ValueError(f"iteration='smooth' needs exactly one input embedding table, the model has {len(tables)}")
    return tables[0]


def make_denoise_step(model, decoder: Decoder, cache: StaticKVCache | None, state_names: tuple[str, ...],
                      smooth: bool):
    """Returns step(*args) over STEP_ARGS + state_names (+ SMOOTH_ARGS when `smooth`), which
    returns the accepted-position mask [B, N]."""
    mask_id = decoder.mask_id
    table = embedding_matrix(model) if smooth else None
    n_fixed, n_state = len(STEP_ARGS), len(state_names)

    def denoise_step(*args):
        (tokens, positions, key_bias, query_rows, block_in_query, block_rows,
         threshold, low_threshold, steps_taken, committed) = args[:n_fixed]
        state = dict(zip(state_names, args[n_fixed:n_fixed + n_state]))
        query_ids = tokens.index_select(1, query_rows)  # [B, Tq]
        query_positions = positions.index_select(1, query_rows)  # [B, Tq]
        block = tokens.index_select(1, block_rows)  # [B, N]
        masked_before = block == mask_id
        if cache is not None:
            cache.bind(query_rows, key_bias)
        bias = None if cache is not None else key_bias
        if smooth:
            smooth_weight, soft_embeds = args[n_fixed + n_state:]
            embeds = _smoothed_embeddings(model, table, query_ids, block_in_query, masked_before, mask_id,
                                          smooth_weight, soft_embeds)
            hidden = model.forward(None, query_positions, cache=cache, inputs_embeds=embeds, attention_bias=bias)
        else:
            hidden = model.forward(query_ids, query_positions, cache=cache, attention_bias=bias)
        logits = model.compute_logits(hidden.index_select(1, block_in_query))  # [B, N, V]
        accept = decoder(logits, block, state, threshold, low_threshold)
        tokens.index_copy_(1, block_rows, block)
        steps_taken.add_(masked_before.any(dim=-1).long())
        committed.add_(accept.sum(dim=-1))
        if smooth:
            # expected embedding under this step's prediction, fed to the still-masked rows next step
            # in the table's dtype: an fp32 copy of a 126k-row table would cost more than the step
            probs = torch.softmax(logits.float(), dim=-1)[..., : table.shape[0]]
            soft_embeds.copy_(probs.to(table.dtype) @ table)
        return accept

    return denoise_step


def _smoothed_embeddings(model, table, query_ids, block_in_query, masked, mask_id, weight, soft_embeds):
    """Inputs of the query rows where the block's still-masked rows get E[mask] + w * soft."""
    embeds = model.embed(query_ids)  # [B, Tq, H]
    block_embeds = embeds.index_select(1, block_in_query)  # [B, N, H]
    soft = table[mask_id].float() + weight * soft_embeds
    block_embeds = torch.where(masked.unsqueeze(-1), soft.to(embeds.dtype), block_embeds)
    return embeds.index_copy(1, block_in_query, block_embeds)
