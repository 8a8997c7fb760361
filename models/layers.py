"""Building blocks shared by the model families: RMSNorm with a threaded residual, rotary
cos/sin tables, attention over a (possibly cached) key/value sequence, the SwiGLU MLP, the
pre-norm decoder layer and the decoder stack with its model interface.

The math itself lives in difuse.patterns (rms_norm, add_rms_norm, qk_norm, apply_rope,
swiglu_fused): calling those reference functions keeps the recorded graphs in the forms the
fusion matchers recognise.

Model interface (every family):
    forward(input_ids [B, T] | None, positions [B, T], cache=None, inputs_embeds [B, T, H] | None,
            attention_bias=None) -> final-normed hidden states [B, T, H] in the model dtype
    compute_logits(hidden [..., H]) -> logits [..., V] in the model dtype
    embed(input_ids) -> [B, T, H];  config (the family's dataclass)
"""
import torch
import torch.nn.functional as F
from torch import nn

from difuse.patterns.add_rms_norm import add_rms_norm
from difuse.patterns.qk_norm import qk_norm
from difuse.patterns.rms_norm import rms_norm
from difuse.patterns.rope import apply_rope
from difuse.patterns.swiglu import swiglu_fused


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. With a residual, adds it first and also returns the sum, so the
    residual stream is threaded through the layers as (x + residual) -> norm in one fused step."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float):
    """positions: int64 [B, T] -> cos, sin: fp32 [B, T, rotary_dim] in rotate-half layout
    (the frequencies repeated twice), always computed in fp32 whatever the model dtype."""
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / rotary_dim))  # [R/2]
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
    return angles.cos(), angles.sin()


def attention(q, k, v, layer_index: int, cache, attention_bias):
    """q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (post-RoPE) -> [B, Hq, T, D].

    With a cache, `cache.update(layer_index, k, v)` stores this step's keys/values and returns
    the keys/values to attend over ([B, Hkv, S, D]) with an additive float bias of at least two
    dims broadcastable to [B, Hq, T, S], e.g. [B, 1, 1, S] for valid lengths (or None). Without
    one, the T tokens attend to each other under `attention_bias`: an additive float bias or a bool
    mask (True: may attend), None for fully bidirectional."""
    if cache is not None:
        if attention_bias is not None:
            raise ValueError("pass the attention bias through the cache when a cache is used")
        k, v, attention_bias = cache.update(layer_index, k, v)
    if attention_bias is not None and attention_bias.is_floating_point() and attention_bias.dtype != q.dtype:
        attention_bias = attention_bias.to(q.dtype)  # some SDPA kernels want the query dtype; a bool mask stays bool
    grouped = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_bias, is_causal=False, enable_gqa=grouped
    )


class Attention(nn.Module):
    """Self-attention with one fused QKV projection (rows [q heads | k heads | v heads]),
    optional per-head QK RMSNorm and clipping, and (partial) rotate-half RoPE."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_index: int,
                 qk_norm_eps: float | None = None, clip_qkv: float | None = None):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.clip_qkv = clip_qkv
        self.qkv = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, x, cos, sin, cache, attention_bias):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)  # [B, T, heads, D]
        if self.q_norm is not None:
            q = qk_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = qk_norm(k, self.k_norm.weight, self.k_norm.eps)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        self.layer_index, cache, attention_bias)  # [B, Hq, T, D]
        return self.out(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up stacked row-wise into one GEMM."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(swiglu_fused(self.gate_up(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, hidden: int, eps: float, attn: Attention, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(hidden, eps)
        self.ffn = ffn

    def forward(self, x, residual, cos, sin, cache, attention_bias):
        """Returns (this block's output delta, residual stream before it): the next norm adds
        them, so every residual add is fused with the norm that follows it."""
        if residual is None:
            x, residual = self.attn_norm(x), x
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.attn(x, cos, sin, cache, attention_bias)
        x, residual = self.ffn_norm(x, residual)
        return self.ffn(x), residual


class DecoderModel(nn.Module):
    """Embedding -> decoder layers -> final RMSNorm, plus a separate LM head run by the caller
    only on the rows it needs. Families build the layers and keep their config in `config`."""

    # Parameter-name suffixes the loader keeps in fp32 whatever the model dtype.
    FP32_PARAMETERS: tuple[str, ...] = ()
    # True for families trained with block-causal attention (a block sees itself and earlier blocks):
    # the runtime's block-diffusion iteration is valid only for those.
    BLOCK_CAUSAL = False

    def __init__(self, config, vocab_size: int, hidden: int, eps: float, rotary_dim: int,
                 rope_theta: float, layers: list[DecoderLayer]):
        super().__init__()
        self.config = config
        self.rotary_dim, self.rope_theta = rotary_dim, rope_theta
        # What a runtime needs to size KV caches and buffers, uniform across families.
        self.num_layers, self.hidden_size, self.vocab_size = len(layers), hidden, vocab_size
        self.num_kv_heads, self.head_dim = layers[0].attn.n_kv_heads, layers[0].attn.head_dim
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, cache=None, inputs_embeds=None, attention_bias=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if positions.dim() != 2 or positions.shape[1] != T or positions.shape[0] not in (1, B):
            raise ValueError(f"positions {tuple(positions.shape)} do not match the tokens [{B}, {T}]")
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.rope_theta)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, cache, attention_bias)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
