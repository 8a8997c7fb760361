"""Step attention: the split-keys Triton kernel against F.scaled_dot_product_attention, and the
pattern on the recorded SDPA op."""
import pytest
import torch
import torch.nn.functional as F
from pattern_checks import DTYPES, assert_close, check_match_runs

from difuse.fusion.record import record
from difuse.patterns import _rows, attention
from difuse.patterns.attention import AttentionPattern, attention_bytes, attention_reference, fused_attention

# (B, Hq, Hkv, T, S, D): odd lengths, grouped heads, head dims that are not powers of two, and
# full query and key tiles (the kernel's unmasked loads)
SHAPES = [(1, 4, 4, 5, 37, 16), (2, 4, 2, 3, 130, 24), (1, 2, 1, 33, 150, 64), (1, 4, 2, 32, 128, 32)]


def step_inputs(shape, dtype, device, bias_kind):
    B, Hq, Hkv, T, S, D = shape
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype).transpose(1, 2)  # [B, Hq, T, D] view, as in the models
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    if bias_kind == "none":
        return q, k, v, None
    if bias_kind == "padding":  # key padding [B, 1, 1, S]: the most negative finite value on padded keys
        bias = torch.zeros(B, 1, 1, S, device=device, dtype=dtype)
        bias[0, ..., : S // 3] = torch.finfo(dtype).min
        return q, k, v, bias
    return q, k, v, torch.randn(B, 1, T, S, device=device, dtype=dtype)  # per query row, shared by heads


@pytest.fixture(params=[132, 4, 1], ids=["split-keys", "split-keys-merge-row-tiles", "unsplit"])
def sm_count(request, monkeypatch):
    """Few programs per SM split the keys (on 4 SMs the merge also takes several rows per program);
    with one SM every (batch, head, tile) program runs unsplit."""
    monkeypatch.setattr(attention, "sm_count", lambda device: request.param)
    monkeypatch.setattr(attention, "_PLANS", _rows.PlanCache())
    return request.param


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy on the kernel's infinities
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias_kind", ["none", "padding", "rows"])
def test_attention_matches_sdpa(device, dtype, shape, bias_kind, sm_count):
    q, k, v, bias = step_inputs(shape, dtype, device, bias_kind)
    expected = attention_reference(q, k, v, bias)
    assert_close(fused_attention(q, k, v, bias), expected)
    laid_out = fused_attention(q, k, v, bias, out_stride=q.stride())
    assert laid_out.stride() == q.stride()
    assert_close(laid_out, expected)


@pytest.mark.gpu
def test_split_attention_is_one_launch_that_leaves_the_counts_zero(device, sm_count):
    """The last slice to arrive merges them in slice order: repeated launches agree bit for bit,
    and each launch hands the next one zeroed arrival counts."""
    if sm_count == 1:
        pytest.skip("unsplit")
    q, k, v, bias = step_inputs(SHAPES[2], torch.float16, device, "padding")
    first = fused_attention(q, k, v, bias)
    (plan,) = attention._PLANS.plans.values()
    assert plan["splits"] > 1 and plan["grid"][2] == 1
    for _ in range(3):
        assert torch.equal(fused_attention(q, k, v, bias), first)
    assert int(plan["workspace"][2].abs().sum()) == 0


@pytest.mark.gpu
def test_split_attention_over_several_query_tiles(device, monkeypatch):
    """Each (batch, head, query tile) counts its own slices' arrivals."""
    monkeypatch.setattr(attention, "sm_count", lambda device: 132)
    monkeypatch.setattr(attention, "_PLANS", _rows.PlanCache())
    monkeypatch.setattr(attention, "MAX_QUERY_ROWS", 16)
    q, k, v, bias = step_inputs(SHAPES[2], torch.float32, device, "rows")
    assert_close(fused_attention(q, k, v, bias), attention_reference(q, k, v, bias))
    (plan,) = attention._PLANS.plans.values()
    assert plan["grid"][2] == 3 and plan["splits"] > 1
    assert int(plan["workspace"][2].abs().sum()) == 0


@pytest.mark.gpu
def test_attention_splits_at_most_max_splits(device, monkeypatch):
    """However many SMs wait for work, the last slice's unrolled merge spans at most MAX_SPLITS."""
    monkeypatch.setattr(attention, "sm_count", lambda device: 10_000)
    monkeypatch.setattr(attention, "_PLANS", _rows.PlanCache())
    monkeypatch.setattr(attention, "MAX_SPLITS", 3)
    q, k, v, bias = step_inputs((1, 1, 1, 2, 300, 16), torch.float32, device, "padding")
    assert_close(fused_attention(q, k, v, bias), attention_reference(q, k, v, bias))
    (plan,) = attention._PLANS.plans.values()
    assert plan["splits"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_takes_the_slices_a_group_at_a_time(device, dtype, monkeypatch):
    """More slices than MERGE_LOADS: the merge loads them in groups, the last group partly masked."""
    monkeypatch.setattr(attention, "sm_count", lambda device: 10_000)
    monkeypatch.setattr(attention, "_PLANS", _rows.PlanCache())
    monkeypatch.setattr(attention, "MERGE_LOADS", 2)
    q, k, v, bias = step_inputs((1, 2, 1, 5, 300, 24), dtype, device, "padding")
    assert_close(fused_attention(q, k, v, bias), attention_reference(q, k, v, bias))
    (plan,) = attention._PLANS.plans.values()
    assert plan["splits"] == 5 and plan["constants"]["MERGE_LOADS"] == 2


@pytest.mark.gpu
def test_attention_scale(device):
    q, k, v, bias = step_inputs(SHAPES[0], torch.float32, device, "padding")
    assert_close(fused_attention(q, k, v, bias, scale=0.3), attention_reference(q, k, v, bias, scale=0.3))


def test_attention_rejects_bad_input(device):
    q, k, v, bias = step_inputs(SHAPES[1], torch.float32, device, "padding")
    with pytest.raises(TypeError, match="bias must be float"):
        fused_attention(q, k, v, bias < 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        fused_attention(q, k, v, bias[..., :5])
    with pytest.raises(ValueError, match="Hkv dividing"):
        fused_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_attention(q, k.half(), v.half())


def test_attention_bytes():
    q, k = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16), torch.empty(1, 1, 10, 8, dtype=torch.bfloat16)
    assert attention_bytes(q, k, k, torch.empty(1, 1, 1, 10)) == 2 * 48 * 2 + 2 * 80 * 2 + 40


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_kind", ["none", "padding"])
def test_attention_matcher(device, dtype, bias_kind):
    q, k, v, bias = step_inputs((1, 2, 2, 4, 20, 16), dtype, device, bias_kind)
    if bias is None:
        match = check_match_runs(AttentionPattern(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v))
    else:
        # CUDA backends may record a padded, sliced copy of the bias before the attention op
        match = check_match_runs(AttentionPattern(), lambda q, k, v, b: F.scaled_dot_product_attention(
            q, k, v, attn_mask=b), (q, k, v, bias), expect_all_nodes=False)
    assert len(match.inputs) == (3 if bias is None else 4)


def test_attention_matcher_skips_causal(device):
    q, k, v, _ = step_inputs((1, 2, 2, 4, 4, 16), torch.float32, device, "none")
    pattern = AttentionPattern()
    assert not pattern.match(record(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v))
