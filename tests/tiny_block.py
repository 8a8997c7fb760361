"""A tiny plain-torch transformer block and dLLM decode step, shared by the compiler tests."""
import torch
import torch.nn.functional as F

from difuse.patterns.confidence import threshold_select, token_confidence
from difuse.patterns.rms_norm import rms_norm
from difuse.patterns.rope import apply_rope
from difuse.patterns.swiglu import swiglu

HIDDEN, HEADS, HEAD_DIM, INTER, VOCAB, MASK_ID = 32, 2, 16, 48, 61, 60


class TinyBlock(torch.nn.Module):
    """RMSNorm -> QKV -> RoPE -> SDPA (bidirectional) -> O -> add -> RMSNorm -> SwiGLU -> add, then an
    LM head. Keys and values are written into a closed-over cache at `positions`."""

    def __init__(self, cache_len: int = 16, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(1)

        def w(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype) * 0.2, requires_grad=False)

        self.attn_norm, self.ffn_norm = w(HIDDEN), w(HIDDEN)
        self.wqkv, self.wo = w(3 * HEADS * HEAD_DIM, HIDDEN), w(HIDDEN, HEADS * HEAD_DIM)
        self.w_gate, self.w_up, self.w_down = w(INTER, HIDDEN), w(INTER, HIDDEN), w(HIDDEN, INTER)
        self.lm_head = w(VOCAB, HIDDEN)
        self.register_buffer("k_cache", torch.zeros(1, cache_len, HEADS, HEAD_DIM, dtype=dtype))  # moves with .to()

    def forward(self, h, cos, sin, positions, eps: float):
        b, t, _ = h.shape
        x = rms_norm(h, self.attn_norm, eps)
        q, k, v = F.linear(x, self.wqkv).view(b, t, 3, HEADS, HEAD_DIM).unbind(2)  # [B, T, H, D] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k_cache.index_copy_(1, positions, k)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + F.linear(attn.transpose(1, 2).reshape(b, t, -1), self.wo)
        x = rms_norm(h, self.ffn_norm, eps)
        h = h + F.linear(swiglu(F.linear(x, self.w_gate), F.linear(x, self.w_up)), self.w_down)
        return h, F.linear(rms_norm(h, self.ffn_norm, eps), self.lm_head)


def rope_tables(t: int, dim: int = HEAD_DIM):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(t).float(), inv)
    emb = torch.cat((angles, angles), dim=-1)[None]  # [1, T, D]
    return emb.cos(), emb.sin()


def decode_step(block_module: TinyBlock):
    """One denoise step: forward, confidence, threshold selection written into `tokens` in place."""

    def step(h, cos, sin, positions, tokens, eps: float, threshold: float, mask_id: int):
        h, logits = block_module(h, cos, sin, positions, eps)
        confidence, token = token_confidence(logits)
        accepted = threshold_select(confidence, token, tokens, mask_id, threshold)
        return {"hidden": h, "accepted": accepted}

    return step
