"""Models for the denoise-step benchmark: the real shapes of each family (and tiny shapes of the
same family for CPU runs), random weights built directly on the device, and the accounting the
roofline needs (weight bytes a step reads, FLOPs a step does, experts a step routes to).

No checkpoint is read: the model is built on the meta device, then every parameter is allocated
on the target device and filled there (matrices ~ N(0, 1/fan_in), norm weights 1, router biases 0),
so an 8B model costs no host memory and no disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difuse.models import LLaDA2Config, LLaDA2Model, LLaDAConfig, LLaDAModel, LLaDAMoEConfig, LLaDAMoEModel
from difuse.models.moe import Experts


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_class: type
    config: object
    block_causal: bool  # LLaDA2: the active block sees only itself and earlier blocks


LLADA_8B = LLaDAConfig(d_model=4096, n_heads=32, n_layers=32, vocab_size=126464, mlp_hidden_size=12288,
                       rope_theta=500000.0, mask_token_id=126336, eos_token_id=126081)
LLADA_MOE_7B = LLaDAMoEConfig(vocab_size=157184, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                              num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                              expert_intermediate_size=1024, qk_layernorm=True, rope_theta=50000.0,
                              max_position_embeddings=8192)
LLADA2_MINI = LLaDA2Config(vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                           num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8,
                           moe_intermediate_size=512, intermediate_size=5120, num_shared_experts=1,
                           first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                           rms_norm_eps=1e-6, rope_theta=600000.0, partial_rotary_factor=0.5)

# Same families at CPU-sized shapes (mask/eos ids moved inside the small vocabularies).
TINY_LLADA = LLaDAConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=320, mlp_hidden_size=96,
                         rope_theta=500000.0, mask_token_id=258, eos_token_id=257)
TINY_LLADA_MOE = LLaDAMoEConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_experts=8, num_experts_per_tok=2, expert_intermediate_size=32,
                                qk_layernorm=True, rope_theta=50000.0, mask_token_id=258, eos_token_id=257)
TINY_LLADA2 = LLaDA2Config(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
                           moe_intermediate_size=16, intermediate_size=96, num_shared_experts=1,
                           first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           rms_norm_eps=1e-6, rope_theta=600000.0, partial_rotary_factor=0.5,
                           mask_token_id=258, eos_token_id=257)

SPECS = {
    "llada-8b": ModelSpec("llada-8b", LLaDAModel, LLADA_8B, block_causal=False),
    "llada-moe-7b": ModelSpec("llada-moe-7b", LLaDAMoEModel, LLADA_MOE_7B, block_causal=False),
    "llada2-mini": ModelSpec("llada2-mini", LLaDA2Model, LLADA2_MINI, block_causal=True),
    "tiny": ModelSpec("tiny", LLaDAModel, TINY_LLADA, block_causal=False),
}
TINY_OF = {"llada-8b": SPECS["tiny"], "tiny": SPECS["tiny"],
           "llada-moe-7b": ModelSpec("llada-moe-7b(tiny)", LLaDAMoEModel, TINY_LLADA_MOE, block_causal=False),
           "llada2-mini": ModelSpec("llada2-mini(tiny)", LLaDA2Model, TINY_LLADA2, block_causal=True)}


def build_random_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The model with random weights, allocated and filled on `device` (parameters the family keeps
    in fp32, such as router biases, stay fp32 as the checkpoint loader keeps them)."""
    with torch.device("meta"):
        model = spec.model_class(spec.config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, meta in model.named_parameters():
        target = torch.float32 if name.endswith(model.FP32_PARAMETERS) else dtype
        tensor = torch.empty(meta.shape, dtype=target, device=device)
        if meta.dim() >= 2:
            tensor.normal_(0.0, meta.shape[-1] ** -0.5, generator=generator)
        elif name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:  # router expert bias
            tensor.zero_()
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class StepGeometry:
    """Sizes of one cached denoise step: `query` rows per sequence run through the model, of which
    `block` get the LM head; keys attended are `keys` (the whole cached sequence, or for a
    block-causal model the prefix up to the block's end)."""

    batch: int
    query: int
    block: int
    keys: int
    cache_length: int


def model_dims(model) -> dict:
    attn = model.layers[0].attn
    return {"layers": len(model.layers), "heads": attn.n_heads, "kv_heads": attn.n_kv_heads,
            "head_dim": attn.head_dim, "hidden": model.embed_tokens.embedding_dim,
            "vocab": model.lm_head.out_features}


def _experts(model) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def expert_bytes(experts: Experts) -> int:
    """Bytes of one expert's weights (gate-up and down)."""
    return (experts.w13[0].numel() + experts.w2[0].numel()) * experts.w13.element_size()


class RoutedExperts:
    """Forward pre-hooks on every expert stack that count, per layer, the distinct experts the
    step's tokens were routed to (the union over all tokens of the batch). Host syncs: use it on
    one eager step outside timing, as a context manager."""

    def __init__(self, model):
        self.experts = _experts(model)
        self.union: list[int] = []
        self._handles = []

    def __enter__(self):
        self.union.clear()

        def count(module, inputs):
            ids = inputs[2]  # Experts.forward(x, weights, ids)
            self.union.append(int(torch.unique(ids).numel()))

        self._handles = [m.register_forward_pre_hook(count) for m in self.experts]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LinearCalls:
    """Forward hooks on every nn.Linear that count its calls by (rows, in_features, out_features,
    dtype): the step's dense matmuls, to be timed alone. Use it on one eager step outside timing."""

    def __init__(self, model):
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.calls: dict[tuple, int] = {}
        self._handles = []

    def __enter__(self):
        self.calls.clear()

        def count(module, inputs):
            x = inputs[0]
            shape = (x.numel() // module.in_features, module.in_features, module.out_features, module.weight.dtype)
            self.calls[shape] = self.calls.get(shape, 0) + 1

        self._handles = [m.register_forward_pre_hook(count) for m in self.linears]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def step_accounting(model, geometry: StepGeometry, routed_union: list[int] | None) -> dict:
    """Bytes and FLOPs of one step at `geometry`.

    weight_bytes: every parameter read once, except the embedding table (only the step's rows
      are gathered) and, for MoE layers, only the experts some token of the step was routed to
      (`routed_union`, one count per MoE layer; None for a dense model).
    kv_bytes: the K and V of every attended key of every layer, read once (dual cache: the
      whole sequence, every step), plus this step's rows written.
    flops: 2 x (parameters a token passes through) x tokens + attention (QK^T and PV, 4 x
      heads x query x keys x head_dim per sequence and layer). The LM head counts for the block
      rows only; the embedding lookup counts no FLOPs.
    """
    dims, g = model_dims(model), geometry
    experts = _experts(model)
    if experts and (routed_union is None or len(routed_union) != len(experts)):
        raise ValueError(f"MoE accounting needs one routed-expert count per MoE layer ({len(experts)}), "
                         f"got {routed_union}")
    expert_params = {id(p) for m in experts for p in m.parameters()}
    embed, lm_head = model.embed_tokens.weight, model.lm_head.weight
    dense = [p for p in model.parameters() if id(p) not in expert_params and p is not embed]
    dense_bytes = sum(p.numel() * p.element_size() for p in dense)
    query_tokens, block_tokens = g.batch * g.query, g.batch * g.block
    embed_bytes = query_tokens * embed.shape[1] * embed.element_size()
    routed_bytes = sum(n * expert_bytes(m) for n, m in zip(routed_union or [], experts))
    weight_bytes = dense_bytes + embed_bytes + routed_bytes

    body_params = sum(p.numel() for p in dense if p is not lm_head)
    top_k = model.config.num_experts_per_tok if experts else 0
    per_token_expert_params = sum(top_k * (m.w13[0].numel() + m.w2[0].numel()) for m in experts)
    attention = 4 * g.batch * dims["layers"] * dims["heads"] * g.query * g.keys * dims["head_dim"]
    flops = (2 * (body_params + per_token_expert_params) * query_tokens + 2 * lm_head.numel() * block_tokens
             + attention)
    kv_element = embed.element_size()
    kv_row_bytes = 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * kv_element  # K and V, all layers
    kv_bytes = g.batch * (g.keys + g.query) * kv_row_bytes
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "flops": flops,
            "active_params_per_token": body_params + per_token_expert_params,
            "total_params": sum(p.numel() for p in model.parameters()),
            "routed_experts_per_layer": None if not experts else sum(routed_union) / len(routed_union),
            "experts_per_layer": None if not experts else experts[0].w13.shape[0]}


def kv_cache_bytes(model, batch: int, length: int, dtype: torch.dtype) -> int:
    dims = model_dims(model)
    return 2 * dims["layers"] * batch * dims["kv_heads"] * length * dims["head_dim"] * dtype.itemsize
