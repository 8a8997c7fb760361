"""Every kernel variant the wrappers launch compiles for an H100 (sm_90), on any host.

The CPU interpreter accepts code that the GPU compiler rejects (plain Python globals in a kernel,
a variable changing type inside a runtime branch, ...). This test runs the host wrappers with the
launches intercepted, then compiles each distinct variant to a cubin with Triton's bundled
toolchain -- no GPU needed. It runs in a subprocess because the kernels must be real JIT functions,
not the interpreter's.

Arguments are specialised as Triton's launcher does on a GPU: an integer 1 becomes a constant, and
pointers and integers divisible by 16 are marked so (what lets loads vectorise). At the step
shapes of the supported models, the kernels must not spill registers to local memory
(`python tests/test_patterns_compile_sm90.py --spills` prints each kernel's registers, stack and
shared memory there).

It also checks that the GPU layout passes duplicate no reduction. A duplicated reduction may sum in
another order, giving another copy of a value with different low bits; the top-k select compared two
such copies of each confidence, so a position could rank behind itself (seen on an H100 only).
"""
import itertools
import os
import subprocess
import sys

import pytest


def _run(*args) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    assert "compiled" in _run()


@pytest.mark.slow
def test_step_kernels_do_not_spill_at_model_shapes():
    assert "no spills" in _run("--spills")


def _intercepted_launches() -> list:
    """From now on the kernels' launches are recorded in the returned list, not run; the wrappers
    accept CPU tensors (the kernels, imported before, stay JIT functions)."""
    from triton.runtime.jit import JITFunction

    import difuse.patterns  # noqa: F401  (every kernel defined while TRITON_INTERPRET=0)

    os.environ["TRITON_INTERPRET"] = "1"
    launches = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    return launches


def _norms_both_weight_orders(norm_inputs) -> None:
    """RMSNorm and Add+RMSNorm launched with each WEIGHT_FIRST, the default last."""
    from difuse.patterns import add_rms_norm, rms_norm

    for weight_first in (not rms_norm.WEIGHT_FIRST, rms_norm.WEIGHT_FIRST):
        rms_norm.WEIGHT_FIRST, rms_norm._PLANS = weight_first, rms_norm.PlanCache()
        for x, w in norm_inputs:
            rms_norm.fused_rms_norm(x, w, 1e-6)
            add_rms_norm.fused_add_rms_norm(x, x, w, 1e-6)


def _launches() -> list:
    import torch

    from difuse.patterns import attention, confidence, kv_write, linear, qk_norm, rope, swiglu

    launches = _intercepted_launches()
    dt = torch.bfloat16
    x, w = torch.randn(4, 100, dtype=dt), torch.randn(100, dtype=dt)
    wide, wide_w = torch.randn(2, 9000, dtype=dt), torch.randn(9000, dtype=dt)
    _norms_both_weight_orders([(x, w), (wide, wide_w)])
    swiglu.fused_swiglu(x, x)
    swiglu.fused_swiglu_packed(torch.randn(4, 200, dtype=dt))
    q = torch.randn(1, 3, 4, 64, dtype=dt)
    partial, full = torch.randn(1, 3, 32), torch.randn(1, 3, 64)
    rope.fused_apply_rope(q, partial, partial)
    qk_norm.fused_qk_norm_rope(q, torch.randn(64, dtype=dt), 1e-6, partial, partial)
    qk_norm.fused_qk_norm_rope(q, torch.randn(64, dtype=dt), 1e-6, full, full)
    many = torch.randn(1, 2112, 4, 64, dtype=dt)  # enough positions for two per program
    many_table = torch.randn(1, 2112, 64)
    rope.fused_apply_rope(many, many_table, many_table)
    qk_norm.fused_qk_norm_rope(many, torch.randn(64, dtype=dt), 1e-6, many_table, many_table)
    logits, block = torch.randn(2, 4, 5000, dtype=dt), torch.full((2, 4), 7)
    for splits in (1, 3):
        for temperature, seed in ((0.0, 0), (0.7, 5), (0.7, torch.tensor(5))):
            confidence.fused_token_confidence(logits, temperature, seed, splits=splits)
            confidence.confidence_threshold_select(logits, block, 7, 0.5, temperature, seed, splits=splits)
        confidence.confidence_threshold_select(logits, block, 7, torch.tensor(0.5), splits=splits)
        confidence.confidence_topk_select(logits, block, 7, torch.tensor([1, 2]), splits=splits)
        confidence.confidence_topk_select(logits, block, 7, 2, splits=splits)
        confidence.confidence_topk_select(logits, block, 7, 2, 0.7, 5, splits=splits)
    confidence.fused_token_confidence(torch.randn(2, 20000, dtype=dt), splits=1, block_v=8192)  # 16 warps
    conf, token = torch.rand(2, 4), torch.randint(0, 9, (2, 4))
    confidence.fused_threshold_select(conf, token, block, 7, 0.5)
    confidence.fused_topk_select(conf, token, block, 7, 2)
    # split K, ragged K, one split; fp16 takes the 16-bit tl.dot that bf16 takes on a GPU
    for rows, outputs, inputs in ((32, 4096, 4096), (5, 1000, 300), (128, 64, 64)):
        linear.fused_linear(torch.randn(rows, inputs, dtype=torch.float16), torch.randn(outputs, inputs, dtype=torch.float16))
    # keys split over programs (the last to arrive merging) and not; a KV-cache write with its passenger
    q, keys = torch.randn(1, 4, 32, 128, dtype=dt), torch.randn(1, 2, 800, 128, dtype=dt)
    attention.fused_attention(q, keys, keys)
    attention.fused_attention(torch.randn(1, 32, 128, 128, dtype=dt), keys[:, :, :64], keys[:, :, :64])
    cache = torch.zeros(1, 2, 40, 128, dtype=dt)
    k_new = torch.randn(1, 8, 2, 128, dtype=dt)
    kv_write.fused_rope_kv_write(k_new, full[:, :1].expand(1, 8, 64), full[:, :1].expand(1, 8, 64),
                                 torch.arange(8) + 30, cache, cache.clone(), k_new.clone())
    return launches


def _signature(fn, args, kwargs):
    """Triton's signature, constants and attributes of a launch, specialised as on a GPU."""
    import torch

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32", torch.bool: "i1"}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        divisible = False
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + types[v.dtype]
            divisible = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int) and v == 1 and not p.do_not_specialize:
            signature[p.name], constexprs[p.name] = "constexpr", 1
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            divisible = v % 16 == 0 and not p.do_not_specialize
        else:
            signature[p.name] = "fp32"
        if divisible and not p.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _compile(fn, args, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    signature, constexprs, attrs = _signature(fn, args, kwargs)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def _with_early_launch(launches: list) -> list:
    """Each launch, and its early-launched variant where it has one (the wrappers launch early only
    on Hopper GPUs, early_launch_options)."""
    out = []
    for fn, args, kwargs in launches:
        kwargs = dict(kwargs)
        kwargs.pop("launch_pdl", None)
        out.append((fn, args, kwargs))
        if "PDL" in kwargs:
            out.append((fn, args, dict(kwargs, PDL=True)))
    return out


def _distinct(launches: list):
    seen = set()
    for fn, args, kwargs in _with_early_launch(launches):
        key = (fn.__name__, *map(repr, _signature(fn, args, kwargs)), kwargs.get("num_warps"), kwargs.get("num_stages"))
        if key not in seen:
            seen.add(key)
            yield fn, args, kwargs


def _compile_all() -> None:
    duplicated, count = [], 0
    for fn, args, kwargs in _distinct(_launches()):
        kernel = _compile(fn, args, kwargs)
        count += 1
        written, compiled = kernel.asm["ttir"].count('"tt.reduce"'), kernel.asm["ttgir"].count('"tt.reduce"')
        if compiled > written:
            duplicated.append(f"{fn.__name__} {_constants(kwargs)}: {written} reductions became {compiled}")
    if duplicated:
        raise SystemExit("reductions duplicated by the layout passes:\n" + "\n".join(duplicated))
    print(f"compiled {count} kernel variants for sm_90")


def _constants(kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if k.isupper()}


# (hidden, query heads, kv heads, FFN width, vocabulary, batches, cache lengths): LLaDA-8B,
# LLaDA2-mini's grouped heads and vocabulary, and the heads and FFN width of one rank of LLaDA-8B
# under 4-way tensor parallelism. A step is 32 block rows per sequence.
MODEL_SHAPES = [(4096, 32, 32, 12288, 126464, (1, 16), (768,)), (2048, 16, 4, 5120, 157184, (1,), (768, 4096)),
                (4096, 8, 8, 3072, 126464, (1,), (768,))]
# (experts, expert FFN width, experts per token, hidden): LLaDA-MoE-7B-A1B and LLaDA2-mini, at
# batch 1 and 16.
MOE_SHAPES = [(64, 1024, 8, 2048), (256, 512, 8, 2048)]


def _model_shape_launches() -> list:
    import torch

    from difuse.patterns import attention, confidence, kv_write, linear, moe, moe_router, qk_norm, rope, swiglu

    launches = _intercepted_launches()
    dt = torch.float16  # the 16-bit tl.dot that bf16 takes on a GPU (the interpreter widens bf16)
    T, D = 32, 128
    for hidden, heads, kv_heads, inner, vocab, batches, contexts in MODEL_SHAPES:
        for batch, S in itertools.product(batches, contexts):
            rows = batch * T
            _norms_both_weight_orders([(torch.empty(rows, hidden, dtype=dt), torch.empty(hidden, dtype=dt))])
            swiglu.fused_swiglu_packed(torch.empty(rows, 2 * inner, dtype=dt))
            if rows <= linear.MAX_ROWS:
                for n, k in (((heads + 2 * kv_heads) * D, hidden), (hidden, heads * D), (2 * inner, hidden),
                             (hidden, inner), (vocab, hidden)):
                    linear.fused_linear(torch.empty(rows, k, dtype=dt), torch.empty(n, k, dtype=dt))
            qkv = torch.empty(batch, T, heads + 2 * kv_heads, D, dtype=dt)
            q, k, v = qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]
            cos, head_w = torch.empty(batch, T, D), torch.empty(D, dtype=dt)
            keys, values = (torch.empty(batch, kv_heads, S, D, dtype=dt) for _ in range(2))
            step_rows = torch.arange(S - T, S)
            rope.fused_apply_rope(q, cos, cos)
            qk_norm.fused_qk_norm_rope(q, head_w, 1e-6, cos, cos)
            kv_write.fused_rope_kv_write(k, cos, cos, step_rows, keys, values, v)
            kv_write.fused_qk_norm_rope_kv_write(k, head_w, cos, cos, step_rows, keys, values, v, 1e-6)
            attention.fused_attention(q.transpose(1, 2), keys, values, torch.zeros(batch, 1, 1, S, dtype=dt))
            confidence.confidence_threshold_select(torch.empty(batch, T, vocab, dtype=dt),
                                                   torch.full((batch, T), 7), 7, 0.9)
    for experts, inner, top_k, hidden in MOE_SHAPES:
        for tokens in (T, 16 * T):
            ids = torch.randint(0, experts, (tokens, top_k))
            moe.fused_moe(torch.empty(tokens, hidden, dtype=dt), torch.empty(experts, 2 * inner, hidden, dtype=dt),
                          torch.empty(experts, hidden, inner, dtype=dt), torch.rand(tokens, top_k), ids)
            moe_router.fused_softmax_topk_router(torch.empty(tokens, experts), top_k)
    return launches


def _check_spills() -> None:
    import re
    import tempfile

    import triton

    spilled, count = [], 0
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        for fn, args, kwargs in _distinct(_model_shape_launches()):
            kernel = _compile(fn, args, kwargs)
            count += 1
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin],
                                   capture_output=True, text=True, check=True).stdout
            regs, stack = (int(re.search(rf"{name}:(\d+)", usage).group(1)) for name in ("REG", "STACK"))
            print(f"{fn.__name__:22s} {regs:3d} registers {stack:4d} B stack {kernel.metadata.shared:6d} B shared  "
                  f"{_constants(kwargs)}")
            if stack:
                spilled.append(f"{fn.__name__} {_constants(kwargs)}: {stack} bytes of stack")
    if spilled:
        raise SystemExit("kernels spill registers to local memory:\n" + "\n".join(spilled))
    print(f"no spills in {count} kernel variants at model shapes")


if __name__ == "__main__":
    _check_spills() if "--spills" in sys.argv else _compile_all()
