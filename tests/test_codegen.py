"""Generic codegen (both backends) against the unfused torch ops, under the interpreter on CPU."""
import pytest
import torch
import torch.nn.functional as F

from difuse.fusion import CompileError, FusionConfig, KernelCompiler, record
from difuse.patterns.add_rms_norm import add_rms_norm
from difuse.patterns.rms_norm import rms_norm

# half precision: one rounding step apart (rsqrt/exp implementations differ by an ulp) is fine
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 1e-2)}


def _softmax32(x):
    return torch.softmax(x.float(), dim=-1)


def _log_softmax_scaled(x, scale: float):
    return torch.log_softmax(x * scale, dim=-1)


def _row_max(x):
    return x.float().exp().max(dim=-1)


def _threshold(x, threshold: float, fill: float):
    return torch.where(x.float() > threshold, x.float() * 2, torch.full_like(x, fill, dtype=torch.float32))


def _swiglu(gate, up):
    return F.silu(gate) * up


def _mean_center(x):
    mean = x.float().mean(-1, keepdim=True)
    return x - mean, mean.squeeze(-1) * 2  # a full and a per-row [rows] output


CASES = {  # name -> (fn, extra positional args builder(rows, cols, dtype))
    "rms_norm": (rms_norm, lambda r, c, d: (torch.randn(c, dtype=d), 1e-6)),
    "add_rms_norm": (add_rms_norm, lambda r, c, d: (torch.randn(r, c, dtype=d), torch.randn(c, dtype=d), 1e-5)),
    "softmax": (_softmax32, lambda r, c, d: ()),
    "log_softmax": (_log_softmax_scaled, lambda r, c, d: (0.7,)),
    "max_dim": (_row_max, lambda r, c, d: ()),
    "threshold": (_threshold, lambda r, c, d: (0.25, -3.0)),
    "swiglu": (_swiglu, lambda r, c, d: (torch.randn(r, c, dtype=d),)),
    "mean_center": (_mean_center, lambda r, c, d: ()),
}
SHAPES = {"5x123": (5, 123, False), "3x1000": (3, 1000, False), "5x123_noncontig": (5, 123, True)}


def _compile_and_run(fn, args, config):
    graph = record(fn, *args)
    group = KernelCompiler(config).compile_group(graph, list(range(len(graph.nodes))))
    env = dict(graph.constants)
    env.update({name: args[pos] for name, pos in graph.inputs.items()})
    outs = group.fn(*[env[v] for v in group.inputs], *[args[i] for i in group.scalar_args])
    return graph, group, dict(zip(group.outputs, outs))


def _check(fn, args, config, dtype):
    graph, group, fused = _compile_and_run(fn, args, config)
    expected = fn(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for leaf, ref in zip(graph.output_leaves, expected):
        got = fused[leaf.name]
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.stride() == ref.stride()
        if ref.dtype.is_floating_point:
            rtol, atol = TOL[ref.dtype if ref.dtype in TOL else dtype]
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
        else:
            assert torch.equal(got, ref), "indices / masks must match exactly"
    return group


def _input(rows, cols, dtype, noncontig):
    if noncontig:
        return torch.randn(cols, rows, dtype=dtype).t()  # [rows, cols], column stride = rows
    return torch.randn(rows, cols, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_generic_kernel_matches_torch(case, shape, dtype, tmp_path, device):
    rows, cols, noncontig = SHAPES[shape]
    fn, extra = CASES[case]
    x = _input(rows, cols, dtype, noncontig).to(device)
    args = (x, *(a.to(device) if isinstance(a, torch.Tensor) else a for a in extra(rows, cols, dtype)))
    # 3x1000 runs the looped path (several column blocks), the others one block per row
    config = FusionConfig(cache_dir=tmp_path, max_single_block=256 if cols > 256 else 8192)
    _check(fn, args, config, dtype)


@pytest.mark.gpu
def test_triton_leading_dims_and_broadcast_operands(tmp_path, device):
    def fn(x, row_scale, col_bias, eps: float):
        y = x * row_scale + col_bias  # per-row [B, T, 1] and per-column [N] operands
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)

    args = (torch.randn(2, 3, 37, device=device), torch.randn(2, 3, 1, device=device),
            torch.randn(37, device=device), 1e-6)
    _check(fn, args, FusionConfig(cache_dir=tmp_path), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("case,shape,dtype", [("rms_norm", "5x123", torch.float16),
                                              ("max_dim", "3x1000", torch.float32),
                                              ("threshold", "5x123_noncontig", torch.bfloat16)], ids=str)
def test_ninetoothed_generic_kernel_matches_torch(case, shape, dtype, tmp_path, device):
    rows, cols, noncontig = SHAPES[shape]
    fn, extra = CASES[case]
    x = _input(rows, cols, dtype, noncontig).to(device)
    args = (x, *(a.to(device) if isinstance(a, torch.Tensor) else a for a in extra(rows, cols, dtype)))
    group = _check(fn, args, FusionConfig(cache_dir=tmp_path, backend="ninetoothed", max_single_block=256), dtype)
    assert "def arrangement" in open(group.source_path).read()


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_ieee_infinities_and_nans_as_torch_gives_them(tmp_path, device):
    """1/0, overflow and inf - inf give inf and NaN as in torch, without numpy's warnings on CPU."""
    def fn(x, y):
        z = 1 / x * y
        return z, z.exp(), z - z

    x = torch.tensor([[0.0, -0.0, 2.0, 1e-30, 5.0]], device=device)
    y = torch.tensor([[1.0, 1.0, 0.0, 1e30, 1e38]], device=device)
    graph, _, fused = _compile_and_run(fn, (x, y), FusionConfig(cache_dir=tmp_path))
    for leaf, ref in zip(graph.output_leaves, fn(x, y)):
        torch.testing.assert_close(fused[leaf.name], ref, equal_nan=True)


def test_runtime_scalars_are_kernel_arguments_not_constexpr(tmp_path):
    x, w = torch.randn(4, 40), torch.randn(40)
    graph, group, _ = _compile_and_run(rms_norm, (x, w, 1e-6), FusionConfig(cache_dir=tmp_path))
    source = open(group.source_path).read()
    assert group.scalar_args == [2] and "s0," in source and "s0: tl.constexpr" not in source
    for eps in (1e-6, 10.0):  # a new eps reuses the same compiled kernel
        out, = group.fn(x, w, eps)
        torch.testing.assert_close(out, rms_norm(x, w, eps))


def test_one_kernel_serves_every_row_count_and_memoises(tmp_path):
    compiler = KernelCompiler(FusionConfig(cache_dir=tmp_path))
    keys = []
    for rows in (3, 7):
        graph = record(rms_norm, torch.randn(rows, 50), torch.randn(50), 1e-6)
        keys.append(compiler.compile_group(graph, list(range(len(graph.nodes)))))
    assert keys[0].key == keys[1].key and keys[1].cache_hit == "memory"
    assert compiler.cache.stats["misses"] == 1


def test_unfusible_groups_raise_compile_error(tmp_path):
    compiler = KernelCompiler(FusionConfig(cache_dir=tmp_path))
    two_reductions = record(lambda x: x.sum(-1) + x.amax(-1), torch.randn(3, 8))
    with pytest.raises(CompileError, match="more than one reduction"):
        compiler.compile_group(two_reductions, list(range(len(two_reductions.nodes))))
    matmul = record(lambda a, b: (a @ b).relu(), torch.randn(3, 8), torch.randn(8, 4))
    with pytest.raises(CompileError, match="not supported"):
        compiler.compile_group(matmul, list(range(len(matmul.nodes))))
    first_dim = record(lambda x: x.sum(0) * 2, torch.randn(3, 8))
    with pytest.raises(CompileError, match="last dim"):
        compiler.compile_group(first_dim, list(range(len(first_dim.nodes))))
