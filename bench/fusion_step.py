"""Compiler benchmark: one recorded dLLM denoise step, eager vs replayed unfused vs fused.

    python -m bench.fusion_step                 # CUDA: LLaDA-8B-like layer dims, 4 layers, 32-token block
    python -m bench.fusion_step --quick         # tiny dims; on CPU the kernels run under the interpreter
    python -m bench.fusion_step --patterns      # also use the pattern library (difuse.patterns)
    python -m bench.fusion_step --profile       # keep a group only if it beats its unfused ops

The step is a stack of plain-torch pre-norm blocks (RMSNorm, QKV, RoPE, SDPA, O, add+RMSNorm,
SwiGLU) over the active block, the LM head on its rows, confidence and threshold selection
written into the block in place. Reports median wall time per step (launches from Python) and,
on CUDA, the step replayed inside a CUDA graph, the compile time, and the FusionReport with
achieved GB/s per fused group. Results are ratios within one run on the named device.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch
import torch.nn.functional as F

from difuse.fusion import FusionConfig, FusionScheduler, record
from difuse.patterns.confidence import threshold_select, token_confidence
from difuse.patterns.rms_norm import rms_norm
from difuse.patterns.rope import apply_rope
from difuse.patterns.swiglu import swiglu

MASK_ID = 126336


def make_step(layers: int, hidden: int, heads: int, inter: int, vocab: int, device, dtype):
    head_dim = hidden // heads

    def w(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) * shape[-1] ** -0.5

    params = [dict(n1=torch.ones(hidden, device=device, dtype=dtype), n2=torch.ones(hidden, device=device, dtype=dtype),
                   qkv=w(3 * hidden, hidden), o=w(hidden, hidden), gate=w(inter, hidden), up=w(inter, hidden),
                   down=w(hidden, inter)) for _ in range(layers)]
    final_norm, lm_head = torch.ones(hidden, device=device, dtype=dtype), w(vocab, hidden)

    def step(h, cos, sin, tokens, eps: float, threshold: float, mask_id: int):
        b, t, _ = h.shape
        for p in params:
            q, k, v = F.linear(rms_norm(h, p["n1"], eps), p["qkv"]).view(b, t, 3, heads, head_dim).unbind(2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            h = h + F.linear(attn.transpose(1, 2).reshape(b, t, -1), p["o"])
            x = rms_norm(h, p["n2"], eps)
            h = h + F.linear(swiglu(F.linear(x, p["gate"]), F.linear(x, p["up"])), p["down"])
        logits = F.linear(rms_norm(h, final_norm, eps), lm_head)
        confidence, token = token_confidence(logits)
        return threshold_select(confidence, token, tokens, mask_id, threshold)

    return step


def wall_us(fn, device: str, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def graph_us(fn, reps: int) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return wall_us(graph.replay, "cuda", reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny dims (CPU interpreter friendly)")
    ap.add_argument("--patterns", action="store_true", help="use the pattern library as well")
    ap.add_argument("--profile", action="store_true", help="time every group fused vs unfused (report GB/s)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick or device == "cpu":
        dims = dict(layers=1, hidden=64, heads=4, inter=96, vocab=257)
        block, reps = 4, 3
    else:
        dims = dict(layers=args.layers, hidden=4096, heads=32, inter=12288, vocab=126464)
        block, reps = args.block, 50
    if args.patterns:
        import difuse.patterns  # noqa: F401  (registers the patterns)
    step = make_step(**dims, device=device, dtype=dtype)
    head_dim = dims["hidden"] // dims["heads"]
    angles = torch.outer(torch.arange(block, device=device).float(),
                         1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cos, sin = torch.cat((angles, angles), -1)[None].cos(), torch.cat((angles, angles), -1)[None].sin()
    h = torch.randn(1, block, dims["hidden"], device=device, dtype=dtype)
    tokens = torch.full((1, block), MASK_ID, device=device)
    call = (h, cos, sin, tokens, 1e-6, 0.9, MASK_ID)

    graph = record(step, *call)
    results = {}
    with torch.no_grad():
        results["eager"] = wall_us(lambda: step(*call), device, reps)
    for name, enable in (("replay unfused", False), ("fused", True)):
        config = FusionConfig(enable_fusion=enable, profile=args.profile,
                              cache_dir=tempfile.mkdtemp(prefix="difuse-bench-"))
        scheduler = FusionScheduler(config, patterns=None if args.patterns else [])
        start = time.perf_counter()
        program = scheduler.compile(graph, *call)
        compile_s = time.perf_counter() - start
        results[name] = wall_us(lambda: program(*call), device, reps)
        if device == "cuda":
            results[name + " (CUDA graph)"] = graph_us(lambda: program(*call), reps)
        print(f"{name}: compile {compile_s:.2f} s, {len(program.fused_groups)} fused groups")
        if enable:
            print(scheduler.report())
    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (Triton interpreter)'}; "
          f"{len(graph.nodes)} recorded ops; dims {dims}; block {block}; {dtype}")
    base = results["eager"]
    for name, us in results.items():
        print(f"{name:<28} {us:10.1f} us/step   {base / us:5.2f}x eager")


if __name__ == "__main__":
    main()
