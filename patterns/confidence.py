"""Decoder confidence selection, the inner loop of every dLLM sampler.

token_confidence: logits [..., V] -> (confidence fp32 [...], token int64 [...]). The token is the
argmax of the logits (at temperature > 0, of the Gumbel-perturbed logits, drawn as the
exponential race logits / T - log(E), E ~ Exp(1)); the confidence is softmax(logits) at that token.

threshold_select / topk_select: choose which still-masked positions of a block to commit and write
their tokens into the block in place. Decisions stay on the device: no host sync.
"""
import torch


def token_confidence(logits: torch.Tensor, temperature: float = 0.0):
    logits32 = logits.float()
    probs = torch.softmax(logits32, dim=-1)
    if temperature > 0:
        noise = torch.empty_like(logits32).exponential_()
        token = (logits32 / temperature - noise.log()).argmax(dim=-1)
        confidence = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, token = probs.max(dim=-1)
    return confidence, token


def threshold_select(confidence, token, block, mask_id: int, threshold):
    """confidence, token, block: [B, N]. Commit every masked position whose confidence reaches
    `threshold`, and always the row's most confident masked position. Writes `block` in place and
    returns the accepted-position mask."""
    masked = block == mask_id
    confidence = torch.where(masked, confidence, float("-inf"))
    row_best = confidence.amax(dim=-1, keepdim=True)
    accept = masked & ((confidence >= threshold) | (confidence == row_best))
    block.copy_(torch.where(accept, token, block))
    return accept


def topk_select(confidence, token, block, mask_id: int, k: torch.Tensor):
    """Commit the k[b] most confident masked positions of each row b (k: int64 [B]). Ties go to
    the lower position. Writes `block` in place and returns the accepted-position mask."""
    masked = block == mask_id
    confidence = torch.where(masked, confidence, float("-inf"))
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    accept = masked & (rank < k.unsqueeze(-1))
    block.copy_(torch.where(accept, token, block))
    return accept
