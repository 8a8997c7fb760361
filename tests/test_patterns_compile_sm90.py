"""Every kernel variant the wrappers launch compiles for an H100 (sm_90), on any host.

The CPU interpreter accepts code that the GPU compiler rejects (plain Python globals in a kernel,
a variable changing type inside a runtime branch, ...). This test runs the host wrappers with the
launches intercepted, then compiles each distinct variant to a cubin with Triton's bundled
toolchain -- no GPU needed. It runs in a subprocess because the kernels must be real JIT functions,
not the interpreter's.

It also checks that the GPU layout passes duplicate no reduction. A duplicated reduction may sum in
another order, giving another copy of a value with different low bits; the top-k select compared two
such copies of each confidence, so a position could rank behind itself (seen on an H100 only).
"""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compiled" in done.stdout


def _launches() -> list:
    import torch
    from triton.runtime.jit import JITFunction

    from difuse.patterns import add_rms_norm, attention, confidence, kv_write, linear, qk_norm, rms_norm, rope, swiglu

    os.environ["TRITON_INTERPRET"] = "1"  # the wrappers then accept CPU tensors; kernels stay JIT functions
    launches = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    dt = torch.bfloat16
    x, w = torch.randn(4, 100, dtype=dt), torch.randn(100, dtype=dt)
    wide, wide_w = torch.randn(2, 9000, dtype=dt), torch.randn(9000, dtype=dt)
    rms_norm.fused_rms_norm(x, w, 1e-6)
    rms_norm.fused_rms_norm(wide, wide_w, 1e-6)
    add_rms_norm.fused_add_rms_norm(x, x, w, 1e-6)
    add_rms_norm.fused_add_rms_norm(wide, wide, wide_w, 1e-6)
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
    import torch

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32", torch.bool: "i1"}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + types[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    return signature, constexprs


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, duplicated = set(), []
    launches = []
    for fn, args, kwargs in _launches():
        kwargs = dict(kwargs)
        kwargs.pop("launch_pdl", None)
        launches.append((fn, args, kwargs))
        if "PDL" in kwargs:  # the wrappers launch early on Hopper GPUs (early_launch_options)
            launches.append((fn, args, dict(kwargs, PDL=True)))
    for fn, args, kwargs in launches:
        num_warps = kwargs.pop("num_warps", 4)
        signature, constexprs = _signature(fn, args, kwargs)
        key = (fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps})
        written, compiled = kernel.asm["ttir"].count('"tt.reduce"'), kernel.asm["ttgir"].count('"tt.reduce"')
        if compiled > written:
            duplicated.append(f"{fn.__name__} {constexprs}: {written} reductions became {compiled}")
    if duplicated:
        raise SystemExit("reductions duplicated by the layout passes:\n" + "\n".join(duplicated))
    print(f"compiled {len(seen)} kernel variants for sm_90")


if __name__ == "__main__":
    _compile_all()
