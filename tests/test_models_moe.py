"""LLaDA-MoE and LLaDA2 against independent reference forwards written from the math with the HF
weight names (routers evaluated token by token), the two routers on crafted scores, the fused
expert checkpoint format, and LLaDA2's block-causal attention."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difuse.models import (
    CheckpointError, LLaDA2Model, LLaDAMoEModel, block_causal_bias, load_model, make_tiny_checkpoint,
    set_moe_dispatch, sigmoid_group_topk_router, softmax_topk_router,
)


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, rotary_dim, theta):
    """x: [B, heads, T, D]; rotate-half on the first rotary_dim features."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, R]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * angles.cos() + rotated * angles.sin(), rest), dim=-1)


def swiglu_mlp(x, W, prefix):
    return (F.silu(x @ W[prefix + "gate_proj.weight"].T) * (x @ W[prefix + "up_proj.weight"].T)) @ W[prefix + "down_proj.weight"].T


def attention_block(n, W, q_w, k_w, v_w, o_w, heads, kv_heads, D, positions, rotary_dim, theta, qk_norms, eps, mask,
                    clip=None):
    B, T, _ = n.shape

    def split(x, count):
        return x.view(B, T, count, D).transpose(1, 2)

    q, k, v = split(n @ q_w.T, heads), split(n @ k_w.T, kv_heads), split(n @ v_w.T, kv_heads)
    if qk_norms is not None:
        q, k = rms(q, qk_norms[0], eps), rms(k, qk_norms[1], eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k = rope(q, positions, rotary_dim, theta), rope(k, positions, rotary_dim, theta)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / D**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * D) @ o_w.T


def reference_llada_moe(path, input_ids, positions):
    cfg = json.loads((path / "config.json").read_text())
    W = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    H, heads, kv_heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    D = H // heads
    rotary_dim = int(D * cfg["partial_rotary_factor"])
    x = W["model.embed_tokens.weight"][input_ids]
    for i, is_moe in enumerate(cfg["moe_layer_freq"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        norms = (W[a + "q_norm.weight"], W[a + "k_norm.weight"]) if cfg["qk_layernorm"] else None
        n = rms(x, W[p + "input_layernorm.weight"], eps)
        x = x + attention_block(n, W, W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"],
                                W[a + "o_proj.weight"], heads, kv_heads, D, positions, rotary_dim, cfg["rope_theta"],
                                norms, eps, None, cfg["clip_qkv"])
        n = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if not is_moe:
            x = x + swiglu_mlp(n, W, p + "mlp.")
            continue
        out = torch.zeros_like(n)
        for b in range(n.shape[0]):
            for t in range(n.shape[1]):
                token = n[b, t]
                probs = torch.softmax(W[p + "mlp.gate.weight"] @ token, dim=-1)
                if cfg["moe_router_enable_expert_bias"]:
                    probs = probs + W[p + "mlp.expert_bias"]
                weights, chosen = probs.topk(cfg["num_experts_per_tok"])
                for w, e in zip(weights, chosen.tolist()):
                    out[b, t] += w * swiglu_mlp(token, W, f"{p}mlp.experts.{e}.")
        if cfg["shared_expert_intermediate_size"]:
            out = out + swiglu_mlp(n, W, p + "shared_expert.")
        x = x + out
    return rms(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


def reference_sigmoid_router(logit_row, bias, top_k, n_group, topk_group, scale):
    """One token, from the description: biased scores choose, unbiased scores weigh."""
    scores = torch.sigmoid(logit_row)
    biased = scores + bias
    per_group = len(scores) // n_group
    rating = [sorted(biased[g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
    kept = sorted(range(n_group), key=lambda g: sum(rating[g]))[-topk_group:]
    candidates = [e for e in range(len(scores)) if e // per_group in kept]
    chosen = sorted(candidates, key=lambda e: biased[e].item())[-top_k:]
    weights = scores[chosen] / scores[chosen].sum() * scale
    return chosen, weights


def reference_llada2(path, input_ids, positions, mask):
    cfg = json.loads((path / "config.json").read_text())
    W = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    heads, kv_heads, D, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    rotary_dim = int(D * cfg["partial_rotary_factor"])
    x = W["model.word_embeddings.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "attention."
        q_w, k_w, v_w = W[a + "query_key_value.weight"].split([heads * D, kv_heads * D, kv_heads * D])
        n = rms(x, W[p + "input_layernorm.weight"], eps)
        x = x + attention_block(n, W, q_w, k_w, v_w, W[a + "dense.weight"], heads, kv_heads, D, positions, rotary_dim,
                                cfg["rope_theta"], (W[a + "query_layernorm.weight"], W[a + "key_layernorm.weight"]),
                                eps, mask)
        n = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu_mlp(n, W, p + "mlp.")
            continue
        out = swiglu_mlp(n, W, p + "mlp.shared_experts.")
        for b in range(n.shape[0]):
            for t in range(n.shape[1]):
                token = n[b, t]
                chosen, weights = reference_sigmoid_router(
                    W[p + "mlp.gate.weight"] @ token, W[p + "mlp.gate.expert_bias"], cfg["num_experts_per_tok"],
                    cfg["n_group"], cfg["topk_group"], cfg["routed_scaling_factor"])
                for w, e in zip(weights, chosen):
                    out[b, t] += w * swiglu_mlp(token, W, f"{p}mlp.experts.{e}.")
        x = x + out
    return rms(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


MOE_VARIANTS = {
    "default": {},
    # dense first layer, shared expert, expert bias, GQA, partial rotary, clipping
    "all_features": dict(moe_layer_freq=[0, 1], shared_expert_intermediate_size=48, moe_router_enable_expert_bias=True,
                         num_key_value_heads=2, partial_rotary_factor=0.5, clip_qkv=3.0),
}


def tolerance(device):
    return dict(atol=2e-4, rtol=2e-4) if device == "cpu" else dict(atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_llada_moe_matches_reference(tmp_path, variant, device):
    overrides = MOE_VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path, kind="llada_moe", seed=2, **overrides)
    model = load_model(path, device, torch.float32)
    assert isinstance(model, LLaDAMoEModel)
    input_ids = torch.randint(0, 320, (2, 9))
    positions = torch.arange(9).expand(2, 9) + torch.tensor([[0], [3]])
    logits = model.compute_logits(model(input_ids.to(device), positions.to(device))).cpu()
    torch.testing.assert_close(logits, reference_llada_moe(path, input_ids, positions), **tolerance(device))


def test_llada_moe_fused_expert_format(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "per_expert", kind="llada_moe", seed=5)
    config = json.loads((path / "config.json").read_text())
    weights = load_file(path / "model.safetensors")
    fused = {k: v for k, v in weights.items() if ".experts." not in k}
    E = config["num_experts"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        fused[p + "w1"] = torch.stack([torch.cat((weights[f"{p}experts.{e}.gate_proj.weight"],
                                                  weights[f"{p}experts.{e}.up_proj.weight"])) for e in range(E)])
        fused[p + "w2"] = torch.stack([weights[f"{p}experts.{e}.down_proj.weight"] for e in range(E)])
    fused_path = tmp_path / "fused"
    fused_path.mkdir()
    save_file(fused, fused_path / "model.safetensors")
    (fused_path / "config.json").write_text(json.dumps(config | {"architectures": ["FusedLLaDAMoEModelLM"]}))

    input_ids, positions = torch.randint(0, 320, (1, 7)), torch.arange(7)[None]
    expected = load_model(path, dtype=torch.float32)(input_ids, positions)
    torch.testing.assert_close(load_model(fused_path, dtype=torch.float32)(input_ids, positions), expected)

    del fused["model.layers.1.mlp.w2"]
    save_file(fused, fused_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.w2"):
        load_model(fused_path)


def test_missing_expert_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path, kind="llada2")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.2.mlp.experts.11.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.11\.up_proj\.weight"):
        load_model(path)


def test_softmax_router_keeps_bias_in_weights_and_does_not_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, 0.3, 0.0])
    probs = torch.softmax(logits, -1)
    weights, ids = softmax_topk_router(logits, 2)
    assert ids.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(weights, probs.gather(1, ids))
    weights, ids = softmax_topk_router(logits, 2, bias)
    assert ids.tolist() == [[0, 2], [2, 3]]  # the bias lifts expert 2 above expert 1 for token 0
    torch.testing.assert_close(weights, (probs + bias).gather(1, ids))


def test_sigmoid_group_router_matches_per_token_reference():
    torch.manual_seed(3)
    logits, bias = torch.randn(20, 16) * 2, torch.randn(16) * 0.3
    weights, ids = sigmoid_group_topk_router(logits, bias, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    for n in range(20):
        chosen, expected = reference_sigmoid_router(logits[n], bias, 4, 4, 2, 2.5)
        order = sorted(range(4), key=lambda j: chosen[j])
        assert sorted(ids[n].tolist()) == sorted(chosen)
        torch.testing.assert_close(weights[n][ids[n].argsort()], expected[order])
        assert len({e // 4 for e in ids[n].tolist()}) <= 2  # experts from at most topk_group groups
    torch.testing.assert_close(weights.sum(-1), torch.full((20,), 2.5))


def test_sigmoid_group_router_groups_restrict_choice():
    # Group 0 holds the single best expert but its second best is poor; groups 1 and 2 rate higher
    # on their top-2 sum, so with topk_group=2 expert 0 is excluded despite the highest score.
    scores = torch.tensor([[0.99, 0.01, 0.0, 0.0, 0.9, 0.9, 0.0, 0.0, 0.8, 0.8, 0.0, 0.0]]).clamp(1e-4, 1 - 1e-4)
    logits = torch.logit(scores)
    _, ids = sigmoid_group_topk_router(logits, None, top_k=2, n_group=3, topk_group=2, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [4, 5]
    _, ids = sigmoid_group_topk_router(logits, None, top_k=2, n_group=3, topk_group=3, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [0, 4]


def test_expert_dispatches_agree():
    from difuse.models.moe import DISPATCHES, Experts

    experts = Experts(num_experts=6, hidden=24, inner=10)
    torch.nn.init.normal_(experts.w13, std=0.2)
    torch.nn.init.normal_(experts.w2, std=0.2)
    x = torch.randn(13, 24)
    weights, ids = softmax_topk_router(torch.randn(13, 6), top_k=2)

    def expert(e, token):
        return swiglu_mlp(token, {"gate_proj.weight": experts.w13[e, :10], "up_proj.weight": experts.w13[e, 10:],
                                  "down_proj.weight": experts.w2[e]}, "")

    expected = torch.stack([sum(w * expert(e, x[n]) for w, e in zip(weights[n], ids[n].tolist())) for n in range(13)])
    for dispatch in ("auto", *DISPATCHES):
        experts.dispatch = dispatch
        torch.testing.assert_close(experts(x, weights, ids), expected, atol=1e-5, rtol=1e-5)
    experts.dispatch = "grouped"
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        experts(x, weights, ids)


def test_block_causal_bias():
    bias = block_causal_bias(7, 3, dtype=torch.float32)
    assert bias.shape == (1, 1, 7, 7)
    visible = bias[0, 0] == 0
    for i in range(7):
        for j in range(7):
            assert visible[i, j] == (j // 3 <= i // 3), (i, j)
    assert torch.isneginf(bias[0, 0][~visible]).all()
    with pytest.raises(ValueError, match="block_length"):
        block_causal_bias(4, 0)


@pytest.fixture(scope="module")
def llada2_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llada2"), kind="llada2", seed=4)


@pytest.mark.gpu
def test_llada2_matches_reference_block_causal(llada2_checkpoint, device):
    model = load_model(llada2_checkpoint, device, torch.float32)
    assert isinstance(model, LLaDA2Model)
    T, block = 10, 4
    input_ids = torch.randint(0, 320, (2, T))
    positions = torch.arange(T).expand(2, T)
    bias = block_causal_bias(T, block, device=device)
    logits = model.compute_logits(model(input_ids.to(device), positions.to(device), attention_bias=bias)).cpu()
    mask = torch.tensor([[j // block <= i // block for j in range(T)] for i in range(T)])
    torch.testing.assert_close(logits, reference_llada2(llada2_checkpoint, input_ids, positions, mask),
                               **tolerance(device))
    bidirectional = model.compute_logits(model(input_ids.to(device), positions.to(device))).cpu()
    torch.testing.assert_close(bidirectional, reference_llada2(llada2_checkpoint, input_ids, positions, None),
                               **tolerance(device))


class PrefixCache:
    """Append-only per-layer K/V: earlier blocks are stored once and never recomputed."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v, None


def test_llada2_blockwise_prefix_cache_is_exact(llada2_checkpoint):
    """Under the block-causal mask a block's keys/values never depend on later blocks, so
    decoding block by block against cached earlier blocks reproduces the full forward."""
    model = load_model(llada2_checkpoint, "cpu", torch.float32)
    T, block = 12, 4
    input_ids = torch.randint(0, 320, (1, T))
    positions = torch.arange(T)[None]
    full = model(input_ids, positions, attention_bias=block_causal_bias(T, block))
    cache = PrefixCache()
    for start in range(0, T, block):
        window = slice(start, start + block)
        out = model(input_ids[:, window], positions[:, window], cache=cache)  # block sees itself + the prefix
        torch.testing.assert_close(out, full[:, window], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_llada2_dispatches_match_sorted(llada2_checkpoint, device):
    model = load_model(llada2_checkpoint, device, torch.float32)
    input_ids, positions = torch.randint(0, 320, (2, 8), device=device), torch.arange(8, device=device)[None]
    set_moe_dispatch(model, "sorted")
    sorted_out = model(input_ids, positions)
    for dispatch in ("dense", "fused"):
        set_moe_dispatch(model, dispatch)
        torch.testing.assert_close(model(input_ids, positions), sorted_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        set_moe_dispatch(model, "grouped")


@pytest.mark.cuda
@pytest.mark.parametrize("dispatch", ["dense", "fused"])
def test_llada2_sync_free_dispatch_captures_in_cuda_graph(llada2_checkpoint, dispatch):
    model = load_model(llada2_checkpoint, "cuda", torch.bfloat16)
    set_moe_dispatch(model, dispatch)
    input_ids = torch.randint(0, 320, (2, 8), device="cuda")
    positions = torch.arange(8, device="cuda")[None]
    bias = block_causal_bias(8, 4, device="cuda", dtype=torch.bfloat16)
    expected = model(input_ids, positions, attention_bias=bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        model(input_ids, positions, attention_bias=bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = model(input_ids, positions, attention_bias=bias)
    input_ids.copy_(torch.randint(0, 320, (2, 8), device="cuda"))
    graph.replay()
    torch.testing.assert_close(captured, model(input_ids, positions, attention_bias=bias))
    assert not torch.equal(captured, expected)


def test_llada2_bf16_router_params_stay_fp32(llada2_checkpoint):
    model = load_model(llada2_checkpoint, "cpu", torch.bfloat16)
    fp32 = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {f"layers.{i}.ffn.{n}" for i in (1, 2) for n in ("gate.weight", "expert_bias")}
    input_ids = torch.randint(0, 320, (1, 8))
    hidden = model(input_ids, torch.arange(8)[None], attention_bias=block_causal_bias(8, 4, dtype=torch.bfloat16))
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()


def test_default_dispatch_is_sync_free(llada2_checkpoint):
    """A recorded denoise step replays its ops for any routing: the default MoE path must not
    read routing results on the host (the sorted reference does, and would bake one routing in).
    On the meta device any host read fails, so running there proves there is none."""
    model = load_model(llada2_checkpoint, "cpu", torch.float32).to("meta")
    input_ids, positions = torch.zeros(2, 8, dtype=torch.int64, device="meta"), torch.arange(8, device="meta")[None]
    assert model(input_ids, positions).shape == (2, 8, 64)
    set_moe_dispatch(model, "sorted")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(input_ids, positions)
