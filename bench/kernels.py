"""Kernel microbenchmarks of the pattern library: fused vs eager vs torch.compile at dLLM shapes.

    python -m bench.kernels            # CUDA: full sweep, ~5-10 minutes on an H100
    python -m bench.kernels --quick    # tiny shapes; on CPU the kernels run under the Triton interpreter

For every pattern and shape: median microseconds from triton.testing.do_bench (launches from
Python, as an eager step pays them) and from do_bench_cudagraph (GPU time inside a CUDA graph, as a
captured denoise step pays it), achieved GB/s from the pattern's bytes-moved model, and the
device's measured copy bandwidth from the same run. Each fused kernel is checked against its
reference before it is timed. Writes bench/results/kernels-<device>.{csv,json,png}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch
import triton

from difuse.patterns import add_rms_norm as add_rms_norm_mod
from difuse.patterns import confidence, qk_norm, rms_norm, rope, swiglu

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    pattern: str
    shape: str
    fused: Callable[[], object]
    eager: Callable[[], object]
    eager_fn: Callable  # the reference, for torch.compile
    args: tuple
    bytes_moved: int
    check: Callable[[], None]


def _close(a, b, exact_ints=True):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if x.dtype in (torch.int64, torch.int32, torch.bool):
            if exact_ints and not torch.equal(x, y):
                raise AssertionError("fused kernel disagrees with its reference (integer outputs)")
        else:
            tol = 2e-2 if x.dtype == torch.bfloat16 else 2e-3
            torch.testing.assert_close(x.float(), y.float(), atol=tol, rtol=tol)


def _elementwise_case(pattern, shape_label, fused_fn, ref_fn, args, params, nbytes):
    return Case(pattern, shape_label,
                fused=lambda: fused_fn(*args, **params), eager=lambda: ref_fn(*args, **params),
                eager_fn=ref_fn, args=args + tuple(params.values()), bytes_moved=nbytes,
                check=lambda: _close(fused_fn(*args, **params), ref_fn(*args, **params)))


def _selection_case(pattern, shape_label, fused_select, ref_select, logits, block0, mask_id, extra):
    """Each call restores the block first, so every timed step sees the same masked positions."""
    block = block0.clone()

    def fused():
        block.copy_(block0)
        return fused_select(logits, block, mask_id, extra)

    def eager_fn(logits, block, block0, mask_id, extra):
        block.copy_(block0)
        conf, token = confidence.token_confidence(logits)
        return ref_select(conf, token, block, mask_id, extra)

    def check():
        fused_block, ref_block = block0.clone(), block0.clone()
        accept = fused_select(logits, fused_block, mask_id, extra)
        conf, token = confidence.token_confidence(logits)
        _close((accept, fused_block), (ref_select(conf, token, ref_block, mask_id, extra), ref_block))

    nbytes = confidence.confidence_select_bytes(logits, block0) + 2 * block0.numel() * block0.element_size()
    return Case(pattern, shape_label, fused=fused, eager=lambda: eager_fn(logits, block, block0, mask_id, extra),
                eager_fn=eager_fn, args=(logits, block, block0, mask_id, extra), bytes_moved=nbytes, check=check)


def build_cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    rows_list = [5] if quick else [32, 256, 1024, 4096]
    hiddens = [256] if quick else [4096, 2048]
    ffn = 384 if quick else 12288
    vocabs = [3000] if quick else [126464, 157184]
    heads, head_dim = (4, 32) if quick else (32, 128)
    mask_id = 7
    cases: list[Case] = []
    opts = dict(device=device, dtype=dtype)
    for rows in rows_list:
        for hidden in hiddens:
            label = f"{rows}x{hidden}"
            x, res = torch.randn(rows, hidden, **opts), torch.randn(rows, hidden, **opts)
            w = torch.randn(hidden, **opts)
            cases.append(_elementwise_case("rms_norm", label, rms_norm.fused_rms_norm, rms_norm.rms_norm,
                                           (x, w), {"eps": 1e-6}, rms_norm.rms_norm_bytes(x, w)))
            cases.append(_elementwise_case("add_rms_norm", label, add_rms_norm_mod.fused_add_rms_norm,
                                           add_rms_norm_mod.add_rms_norm, (x, res, w), {"eps": 1e-6},
                                           add_rms_norm_mod.add_rms_norm_bytes(x, res, w)))
        gate, up = torch.randn(rows, ffn, **opts), torch.randn(rows, ffn, **opts)
        gate_up = torch.randn(rows, 2 * ffn, **opts)
        cases.append(_elementwise_case("swiglu", f"{rows}x{ffn}", swiglu.fused_swiglu, swiglu.swiglu,
                                       (gate, up), {}, swiglu.swiglu_bytes(gate, up)))
        cases.append(_elementwise_case("swiglu_packed", f"{rows}x{2 * ffn}", swiglu.fused_swiglu_packed,
                                       swiglu.swiglu_fused, (gate_up,), {}, swiglu.swiglu_packed_bytes(gate_up)))
        q = torch.randn(1, rows, heads, head_dim, **opts)
        angles = torch.randn(1, rows, head_dim // 2, device=device)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        qw = torch.randn(head_dim, **opts)
        label = f"{rows}x{heads}x{head_dim}"
        cases.append(_elementwise_case("rope", label, rope.fused_apply_rope, rope.apply_rope, (q, cos, sin), {},
                                       rope.rope_bytes(q, cos, sin)))
        cases.append(_elementwise_case("qk_norm_rope", label, qk_norm.fused_qk_norm_rope, qk_norm.qk_norm_rope,
                                       (q, qw, 1e-6, cos, sin), {}, qk_norm.qk_norm_rope_bytes(q, qw, 1e-6, cos, sin)))
        for vocab in vocabs:
            label = f"{rows}x{vocab}"
            logits = torch.randn(rows, vocab, device=device) * 4
            # a unique row maximum, so the exact token check is not decided by a bf16 tie
            logits[torch.arange(rows, device=device), torch.randint(0, vocab, (rows,), device=device)] = \
                logits.amax(-1) + 1
            logits = logits.to(dtype)
            cases.append(_elementwise_case("token_confidence", label, confidence.fused_token_confidence,
                                           confidence.token_confidence, (logits,), {},
                                           confidence.token_confidence_bytes(logits)))
            block_len = min(rows, 32)
            # every position still masked (a block's first step): the bytes model is then exact
            block0 = torch.full((rows // block_len, block_len), mask_id, device=device, dtype=torch.int64)
            batched = logits[: block0.numel()].view(*block0.shape, vocab)
            cases.append(_selection_case("confidence_threshold_select", label,
                                         confidence.confidence_threshold_select, confidence.threshold_select,
                                         batched, block0, mask_id, 0.9))
            k = torch.full((block0.shape[0],), 2, device=device, dtype=torch.int64)
            cases.append(_selection_case("confidence_topk_select", label, confidence.confidence_topk_select,
                                         confidence.topk_select, batched, block0, mask_id, k))
    return cases


def _time_cpu(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _time_cuda(fn) -> tuple[float, float]:
    """(median us with Python launches, median us replayed from a CUDA graph)."""
    launched = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    try:
        graphed = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception:  # not capturable (e.g. a host sync); reported as missing
        graphed = float("nan")
    return launched, graphed


def copy_bandwidth(device: str) -> float:
    """GB/s of a device-to-device copy (read + write), the practical bandwidth ceiling."""
    n = (1 << 28) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    if device == "cuda":
        us = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") * 1e3
    else:
        us = _time_cpu(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / us / 1e3


def device_label(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    return name, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def run(quick: bool, compile_baseline: bool, only: list[str] | None) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and compile_baseline:
        print("note: no torch.compile timings on CPU (inductor's C++ build per shape would dominate the run)")
        compile_baseline = False
    torch._dynamo.config.recompile_limit = 1024  # one static compile per shape, never an eager fallback
    name, slug = device_label(device)
    bandwidth = copy_bandwidth(device)
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbs": round(bandwidth, 1), "quick": quick,
            "timer": "do_bench median + do_bench_cudagraph median" if device == "cuda" else "perf_counter median"}
    if device == "cpu":
        meta["note"] = "Triton interpreter on CPU: checks that the benchmark runs; the timings mean nothing"
        print(meta["note"])
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for case in build_cases(device, torch.bfloat16, quick):
        if only and case.pattern not in only:
            continue
        try:
            case.check()
            checked = "ok"
        except AssertionError as error:  # reported, not fatal: the other cases still run
            checked = f"MISMATCH: {str(error).splitlines()[0]}"
            print(f"{case.pattern} {case.shape}: {checked}")
        providers = {"fused": case.fused, "eager": case.eager}
        if compile_baseline:
            compiled = torch.compile(case.eager_fn, dynamic=False)
            providers["compile"] = lambda compiled=compiled, case=case: compiled(*case.args)
        for provider, fn in providers.items():
            if device == "cuda":
                us, us_graph = _time_cuda(fn)
            else:
                us, us_graph = _time_cpu(fn, 3), float("nan")
            best = us if us_graph != us_graph else min(us, us_graph)
            row = {"pattern": case.pattern, "shape": case.shape, "provider": provider, "us": round(us, 2),
                   "us_graph": round(us_graph, 2), "us_best": round(best, 2), "bytes": case.bytes_moved,
                   "gbs": round(case.bytes_moved / best / 1e3, 1),
                   "of_copy_bw": round(case.bytes_moved / best / 1e3 / bandwidth, 3), "checked": checked}
            rows.append(row)
            print(f"{case.pattern:28s} {case.shape:14s} {provider:8s} {us:10.1f} us  graph {us_graph:10.1f} us"
                  f"  {row['gbs']:8.1f} GB/s  ({row['of_copy_bw']:.0%} of copy)")
        fused_us = rows[-len(providers)]["us_best"]
        ratios = "  ".join(f"vs {r['provider']} {r['us_best'] / fused_us:.2f}x" for r in rows[-len(providers) + 1:])
        print(f"{'':28s} {'':14s} fused speed-up {ratios}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"kernels-{slug}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    plot(rows, meta, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, .json, .png")
    return rows


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["pattern"], r["shape"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    gbs = {(r["pattern"], r["shape"], r["provider"]): r["gbs"] for r in rows}
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cases)), 5))
    for k, provider in enumerate(providers):
        xs = [i + k * width for i in range(len(cases))]
        ax.bar(xs, [gbs.get((p, s, provider), 0) for p, s in cases], width, label=provider)
    ax.axhline(meta["copy_bandwidth_gbs"], color="black", linestyle="--", linewidth=1, label="copy bandwidth")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{p}\n{s}" for p, s in cases], rotation=90, fontsize=6)
    ax.set_ylabel("achieved GB/s (bytes model / best time)")
    ax.set_title(f"difuse kernels on {meta['device']} ({meta['date'][:10]}, torch {meta['torch']}, "
                 f"triton {meta['triton']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds; CPU interpreter works)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--only", nargs="*", help="pattern names to run")
    args = parser.parse_args(argv)
    run(args.quick, not args.no_compile, args.only)


if __name__ == "__main__":
    main()
