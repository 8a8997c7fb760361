"""Decoders: which still-masked positions of the active block to commit after one denoise step.

Every decoder takes the block's logits [B, N, V] and the block's tokens [B, N] (int64) and writes the
committed tokens into `block` in place; it returns nothing, so the recorded step holds no extra
reader of the selection's accept mask (the selection matchers want it used by the write only). Decisions
stay on the device (no .item(), no data-dependent shapes), so a step can be captured in a CUDA
graph and repeated on a finished block as a no-op: with no masked position nothing is accepted.
The confidence selection goes through the difuse.patterns references (token_confidence,
threshold_select, topk_select) so the recorded step contains the forms the fusion matchers know.

Per-block state (schedules, credit) lives in tensors from `init_state`, reset in place by
`start_block`; thresholds arrive as 0-dim device tensors so changing them never re-records.
"""
from __future__ import annotations

import torch

from difuse.patterns.confidence import threshold_select, token_confidence, topk_select
from difuse.runtime.config import GenerationConfig


class Decoder:
    def __init__(self, mask_id: int, temperature: float):
        self.mask_id = mask_id
        self.temperature = temperature

    def init_state(self, batch: int, block_length: int, vocab: int, device) -> dict[str, torch.Tensor]:
        return {}

    def start_block(self, state: dict[str, torch.Tensor], block: torch.Tensor) -> None:
        """Reset per-block state in place (host side, before the block's first step)."""

    def __call__(self, logits, block, state, threshold, low_threshold) -> None:
        raise NotImplementedError


class FixedScheduleDecoder(Decoder):
    """LLaDA's reference sampler: the block's M masks are committed over `steps` steps,
    floor(M/steps)+1 tokens in the first M % steps steps and floor(M/steps) after, the most
    confident first ('low_confidence' remasking) or in random order (`random_order`)."""

    def __init__(self, mask_id: int, temperature: float, steps: int, random_order: bool):
        super().__init__(mask_id, temperature)
        self.steps = steps
        self.random_order = random_order

    def init_state(self, batch, block_length, vocab, device):
        return {"masks_at_start": torch.zeros(batch, dtype=torch.int64, device=device),
                "step_index": torch.zeros((), dtype=torch.int64, device=device)}

    def start_block(self, state, block):
        state["masks_at_start"].copy_((block == self.mask_id).sum(dim=-1))
        state["step_index"].zero_()

    def __call__(self, logits, block, state, threshold, low_threshold):
        confidence, token = token_confidence(logits, self.temperature)
        if self.random_order:
            confidence = torch.rand(confidence.shape, device=confidence.device)
        masks, step = state["masks_at_start"], state["step_index"]
        count = masks // self.steps + (step < masks % self.steps).long()  # [B]
        topk_select(confidence, token, block, self.mask_id, count)
        step.add_(1)


class ThresholdDecoder(Decoder):
    """Commit every masked position whose confidence reaches the threshold, and always the row's
    most confident one (Fast-dLLM's rule; guaranteed progress without a host check)."""

    def __call__(self, logits, block, state, threshold, low_threshold):
        confidence, token = token_confidence(logits, self.temperature)
        threshold_select(confidence, token, block, self.mask_id, threshold)


class HierarchyDecoder(Decoder):
    """At most one uncertain token per contiguous masked run: in every maximal run of masked
    positions commit the most confident one if it beats `low_threshold`; also commit everything
    at or above `threshold` and the row's top-1. Works row by row, so any batch size."""

    def __call__(self, logits, block, state, threshold, low_threshold):
        confidence, token = token_confidence(logits, self.temperature)
        masked = block == self.mask_id
        # run ids: a run starts at a masked position whose left neighbour is not masked
        previous = torch.nn.functional.pad(masked[:, :-1], (1, 0), value=False)
        run_id = torch.cumsum((masked & ~previous).long(), dim=-1).clamp(min=1) - 1  # [B, N]
        masked_confidence = torch.where(masked, confidence, float("-inf"))
        run_best = torch.full_like(masked_confidence, float("-inf")).scatter_reduce(
            -1, run_id, masked_confidence, reduce="amax")
        run_accept = masked & (masked_confidence == run_best.gather(-1, run_id)) & (confidence > low_threshold)
        threshold_select(confidence, token, block, self.mask_id, threshold)
        block.copy_(torch.where(run_accept, token, block))


class CreditDecoder(Decoder):
    """CreditDecoding (arXiv 2510.06133): credit[b, i, v] accumulates top1_p ** gamma whenever v
    is position i's top-1 while masked, decays by beta per step inside the block, and boosts the
    logits to logits + alpha * log(1 + credit) before the threshold rule."""

    def __init__(self, mask_id: int, temperature: float, alpha: float, gamma: float, beta: float):
        super().__init__(mask_id, temperature)
        self.alpha, self.gamma, self.beta = alpha, gamma, beta

    def init_state(self, batch, block_length, vocab, device):
        return {"credit": torch.zeros(batch, block_length, vocab, dtype=torch.float32, device=device),
                "step_index": torch.zeros((), dtype=torch.int64, device=device)}

    def start_block(self, state, block):
        state["credit"].zero_()
        state["step_index"].zero_()

    def __call__(self, logits, block, state, threshold, low_threshold):
        credit, step = state["credit"], state["step_index"]
        credit.mul_(torch.where(step == 0, 1.0, self.beta))
        top_probability, top_token = token_confidence(logits, 0.0)
        boost = torch.where(block == self.mask_id, top_probability.pow(self.gamma), 0.0)
        credit.scatter_add_(-1, top_token.unsqueeze(-1), boost.unsqueeze(-1))
        boosted = logits.float() + self.alpha * torch.log1p(credit)
        confidence, token = token_confidence(boosted, self.temperature)
        step.add_(1)
        threshold_select(confidence, token, block, self.mask_id, threshold)


def make_decoder(config: GenerationConfig, mask_id: int) -> Decoder:
    if config.decoder in ("fixed", "random"):
        return FixedScheduleDecoder(mask_id, config.temperature, config.steps_per_block,
                                    random_order=config.decoder == "random")
    if config.decoder == "threshold":
        return ThresholdDecoder(mask_id, config.temperature)
    if config.decoder == "hierarchy":
        return HierarchyDecoder(mask_id, config.temperature)
    return CreditDecoder(mask_id, config.temperature, config.credit_alpha, config.credit_gamma, config.credit_beta)
