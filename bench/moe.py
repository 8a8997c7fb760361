"""Routed-expert (MoE) microbenchmark: the fused Triton kernels against the two PyTorch dispatches.

    python -m bench.moe            # CUDA: LLaDA-MoE-7B and LLaDA2.0-mini expert shapes, bf16
    python -m bench.moe --quick    # tiny shapes; on CPU the kernels run under the Triton interpreter

For every (model shape, token count, routing: spread over the experts or skewed onto a few):
median microseconds of fused_moe, moe_sorted_reference (one GEMM pair per routed expert, host
sync per call) and moe_dense_reference (every expert on every token), launched from Python; on
CUDA also the fused and dense paths inside a CUDA graph (as a captured denoise step runs them;
the sorted path cannot be captured). Achieved GB/s use one bytes model for all three: the
weights of the distinct experts actually routed to plus the activations and routing tensors
(difuse.patterns.moe.moe_bytes), next to the device's measured copy bandwidth. Each fused result
is checked against the sorted reference before it is timed.
Writes bench/results/moe-<device>.{csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch

from difuse.patterns.moe import fused_moe, moe_bytes, moe_dense_reference, moe_sorted_reference
from difuse.patterns.moe_router import softmax_topk_router

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (experts, top_k, hidden, expert inner size), from the models' config.json
SHAPES = {"llada_moe_7b": (64, 8, 2048, 1024), "llada2_mini": (256, 8, 2048, 512)}
QUICK_SHAPES = {"tiny": (4, 2, 64, 32)}
TOKENS = [32, 128, 512, 2048]  # one block of 32 at batch 1, 4, 16, 64
QUICK_TOKENS = [7]
# Router logits plus this times a per-expert bias: "spread" reaches most experts, "skewed" about
# twelve of 64 at 32 tokens, as bench.step's random-weight LLaDA-MoE routes (11.4 a layer).
ROUTINGS = {"spread": 0.0, "skewed": 6.0}


def _time_us(fn, cuda: bool, graph: bool = False) -> float:
    if cuda:
        import triton.testing

        bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
        return bench(fn, rep=100) * 1e3
    fn()  # warm-up (compiles the interpreter's kernels)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def copy_bandwidth_gbs(device: str) -> float:
    """Achieved device copy bandwidth (read + write) on a 1 GiB buffer (16 MiB on CPU)."""
    n = (1 << 30 if device == "cuda" else 1 << 24) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    us = _time_us(lambda: dst.copy_(src), device == "cuda")
    return 2 * n * 4 / us / 1e3


def run_case(name, experts, top_k, hidden, inner, tokens, routing, dtype, device) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator)
    w13 = torch.randn(experts, 2 * inner, hidden, device=device, dtype=dtype, generator=generator) / hidden**0.5
    w2 = torch.randn(experts, hidden, inner, device=device, dtype=dtype, generator=generator) / inner**0.5
    logits = torch.randn(tokens, experts, device=device, generator=generator)
    logits += ROUTINGS[routing] * torch.randn(experts, device=device, generator=generator)
    weights, ids = softmax_topk_router(logits, top_k)
    args = (x, w13, w2, weights, ids)
    tol = 4e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(fused_moe(*args).float(), moe_sorted_reference(*args).float(), atol=tol, rtol=tol)
    cuda = device == "cuda"
    nbytes = moe_bytes(*args)
    row = {"shape": name, "tokens": tokens, "routing": routing, "experts": experts, "top_k": top_k, "hidden": hidden,
           "inner": inner, "dtype": str(dtype).removeprefix("torch."),
           "experts_hit": int(torch.unique(ids).numel()), "bytes": nbytes}
    timings = {"fused_us": lambda: fused_moe(*args), "sorted_us": lambda: moe_sorted_reference(*args),
               "dense_us": lambda: moe_dense_reference(*args)}
    for key, fn in timings.items():
        row[key] = _time_us(fn, cuda)
    if cuda:
        row["fused_graph_us"] = _time_us(timings["fused_us"], cuda, graph=True)
        row["dense_graph_us"] = _time_us(timings["dense_us"], cuda, graph=True)
    for key in [k for k in row if k.endswith("_us")]:
        row[key.removesuffix("_us") + "_gbs"] = nbytes / row[key] / 1e3
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU-friendly)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shapes, token_counts = (QUICK_SHAPES, QUICK_TOKENS) if args.quick else (SHAPES, TOKENS)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    copy_gbs = copy_bandwidth_gbs(device)
    rows = [run_case(name, *shape, tokens, routing, dtype, device)
            for name, shape in shapes.items() for tokens in token_counts for routing in ROUTINGS]

    print(f"device: {device_name}; measured copy bandwidth {copy_gbs:.0f} GB/s")
    columns = ["fused", "sorted", "dense"] + (["fused_graph", "dense_graph"] if device == "cuda" else [])
    print(f"{'shape':<14}{'tokens':>7}{'routing':>8}{'hit':>5}"
          + "".join(f"{c + ' us':>16}{'GB/s':>8}" for c in columns))
    for row in rows:
        print(f"{row['shape']:<14}{row['tokens']:>7}{row['routing']:>8}{row['experts_hit']:>5}"
              + "".join(f"{row[c + '_us']:>16.1f}{row[c + '_gbs']:>8.0f}" for c in columns))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"moe-{device_name.replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device_name, "copy_gbs": copy_gbs, "rows": rows},
                                                    indent=2))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {stem}.json and .csv")


if __name__ == "__main__":
    main()
