"""Kernel microbenchmarks of the pattern library: fused vs eager vs torch.compile at dLLM shapes.

    python -m bench.kernels            # CUDA: full sweep, ~5-10 minutes on an H100
    python -m bench.kernels --quick    # tiny shapes; on CPU the kernels run under the Triton interpreter
    python -m bench.kernels --rows 32,4096   # only these token rows (4096: the bandwidth bar; 32: a step's block)

For every pattern and shape: median microseconds from triton.testing.do_bench (launches from
Python, as an eager step pays them), from do_bench_cudagraph (GPU time inside a CUDA graph, as a
captured denoise step pays it; the graph cycles through copies of the inputs totalling >= 4x the
L2 size, so every call reads from HBM as in a real step; the faster of two passes that time the
providers in opposite orders), the host time per call (wrapper + launch,
calls enqueued back to back), achieved GB/s from the pattern's bytes-moved model, and the
device's measured copy bandwidth from the same run. Each fused kernel is checked against its
reference before it is timed. Writes bench/results/kernels-<device>.{csv,json,png}.

Kernels launch serially here (difuse.fusion.launch.serial_launches): this compares kernels, and
early launch is an overlap between the different kernels of a step.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch
import triton

from difuse.fusion.launch import serial_launches
from difuse.fusion.scheduler import replica

from difuse.patterns import add_rms_norm as add_rms_norm_mod
from difuse.patterns import attention, confidence, kv_write, linear, qk_norm, rms_norm, rope, swiglu

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One timed configuration. Every provider is called as fn(*args); the graph timing calls it
    on rotating copies of args (see rotated_inputs)."""
    pattern: str
    shape: str
    fused: Callable
    eager: Callable  # the reference; also what torch.compile compiles
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
    """params are passed positionally after args (every wrapper and reference takes them so)."""
    args = args + tuple(params.values())
    return Case(pattern, shape_label, fused=fused_fn, eager=ref_fn, args=args, bytes_moved=nbytes,
                check=lambda: _close(fused_fn(*args), ref_fn(*args)))


def _selection_case(pattern, shape_label, fused_select, ref_select, logits, block0, mask_id, extra):
    """Each call restores the block first, so every timed step sees the same masked positions."""

    def fused(logits, block, block0, mask_id, extra):
        block.copy_(block0)
        return fused_select(logits, block, mask_id, extra)

    def eager(logits, block, block0, mask_id, extra):
        block.copy_(block0)
        conf, token = confidence.token_confidence(logits)
        return ref_select(conf, token, block, mask_id, extra)

    def check():
        fused_block, ref_block = block0.clone(), block0.clone()
        accept = fused_select(logits, fused_block, mask_id, extra)
        conf, token = confidence.token_confidence(logits)
        _close((accept, fused_block), (ref_select(conf, token, ref_block, mask_id, extra), ref_block))

    nbytes = confidence.confidence_select_bytes(logits, block0) + 2 * block0.numel() * block0.element_size()
    return Case(pattern, shape_label, fused=fused, eager=eager, args=(logits, block0.clone(), block0, mask_id, extra),
                bytes_moved=nbytes, check=check)


def _cache_write_case(rows: int, heads: int, head_dim: int, cache_length: int, opts: dict) -> Case:
    """A step's k/v (views of a fused QKV output) rotated and written into the cache buffers at
    rows [cache_length - rows, cache_length). Repeated calls rewrite the same rows."""
    qkv = torch.randn(1, rows, 3 * heads, head_dim, **opts)
    k, v = qkv[:, :, heads:2 * heads], qkv[:, :, 2 * heads:]
    angles = torch.randn(1, rows, head_dim // 2, device=opts["device"])
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    where = torch.arange(cache_length - rows, cache_length, device=opts["device"])
    keys, values = (torch.zeros(1, heads, cache_length, head_dim, **opts) for _ in range(2))
    args = (k, cos, sin, where, keys, values, v)

    def check():
        fused = kv_write.fused_rope_kv_write(k, cos, sin, where, keys.clone(), values.clone(), v)
        _close(fused, kv_write.rope_kv_write(k, cos, sin, where, keys.clone(), values.clone(), v))

    return Case("rope_kv_write", f"{rows}x{heads}x{head_dim}", kv_write.fused_rope_kv_write, kv_write.rope_kv_write,
                args, kv_write.kv_write_bytes(k, cos, where, keys, v), check)


def _attention_case(batch: int, block: int, context: int, heads: int, head_dim: int, opts: dict) -> Case:
    """A dual-cache step: `block` query rows per sequence over the whole `context`, with a
    key-padding bias (the first sequence's first 16 keys padded)."""
    q = torch.randn(batch, block, heads, head_dim, **opts).transpose(1, 2)
    k, v = (torch.randn(batch, heads, context, head_dim, **opts) for _ in range(2))
    bias = torch.zeros(batch, 1, 1, context, **opts)
    bias[0, ..., :16] = torch.finfo(bias.dtype).min
    return _elementwise_case("attention", f"{batch}x{block}x{context}", attention.fused_attention,
                             attention.attention_reference, (q, k, v, bias), {},
                             attention.attention_bytes(q, k, v, bias))


def build_cases(device: str, dtype: torch.dtype, quick: bool, rows: list[int] | None = None) -> Iterator[Case]:
    """The cases one at a time: a case's inputs are allocated when it is reached, not all up front
    (bench.tune_launch builds its inputs alone too). `rows`: the token rows to run (default: all)."""
    rows_list = rows or ([5] if quick else [32, 256, 1024, 4096])
    hiddens = [256] if quick else [4096, 2048]
    ffn = 384 if quick else 12288
    vocabs = [3000] if quick else [126464, 157184]
    heads, head_dim = (4, 32) if quick else (32, 128)
    mask_id = 7
    opts = dict(device=device, dtype=dtype)
    for rows in rows_list:
        for hidden in hiddens:
            label = f"{rows}x{hidden}"
            x, res = torch.randn(rows, hidden, **opts), torch.randn(rows, hidden, **opts)
            w = torch.randn(hidden, **opts)
            yield _elementwise_case("rms_norm", label, rms_norm.fused_rms_norm, rms_norm.rms_norm,
                                    (x, w), {"eps": 1e-6}, rms_norm.rms_norm_bytes(x, w))
            yield _elementwise_case("add_rms_norm", label, add_rms_norm_mod.fused_add_rms_norm,
                                    add_rms_norm_mod.add_rms_norm, (x, res, w), {"eps": 1e-6},
                                    add_rms_norm_mod.add_rms_norm_bytes(x, res, w))
        gate, up = torch.randn(rows, ffn, **opts), torch.randn(rows, ffn, **opts)
        gate_up = torch.randn(rows, 2 * ffn, **opts)
        yield _elementwise_case("swiglu", f"{rows}x{ffn}", swiglu.fused_swiglu, swiglu.swiglu,
                                (gate, up), {}, swiglu.swiglu_bytes(gate, up))
        yield _elementwise_case("swiglu_packed", f"{rows}x{2 * ffn}", swiglu.fused_swiglu_packed,
                                swiglu.swiglu_fused, (gate_up,), {}, swiglu.swiglu_packed_bytes(gate_up))
        q = torch.randn(1, rows, heads, head_dim, **opts)
        angles = torch.randn(1, rows, head_dim // 2, device=device)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        qw = torch.randn(head_dim, **opts)
        label = f"{rows}x{heads}x{head_dim}"
        yield _elementwise_case("rope", label, rope.fused_apply_rope, rope.apply_rope, (q, cos, sin), {},
                                rope.rope_bytes(q, cos, sin))
        yield _elementwise_case("qk_norm_rope", label, qk_norm.fused_qk_norm_rope, qk_norm.qk_norm_rope,
                                (q, qw, 1e-6, cos, sin), {}, qk_norm.qk_norm_rope_bytes(q, qw, 1e-6, cos, sin))
        yield _cache_write_case(rows, heads, head_dim, rows + (16 if quick else 512), opts)
        if rows <= linear.STREAMING_ROWS:  # LLaDA-8B's QKV, attention out, gate_up and FFN down projections
            for n, k in [(96, 80)] if quick else [(12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]:
                x, weight = torch.randn(rows, k, **opts), torch.randn(n, k, **opts) / k**0.5
                yield _elementwise_case("linear", f"{rows}x{n}x{k}", linear.fused_linear, linear.linear,
                                        (x, weight), {}, linear.linear_bytes(x, weight))
        block, context = (4, 24) if quick else (32, 768)
        if rows % block == 0 or quick:
            yield _attention_case(max(1, rows // block), block, context, heads, head_dim, opts)
        for vocab in vocabs:
            label = f"{rows}x{vocab}"
            logits = torch.randn(rows, vocab, device=device) * 4
            # a unique row maximum, so the exact token check is not decided by a bf16 tie
            logits[torch.arange(rows, device=device), torch.randint(0, vocab, (rows,), device=device)] = \
                logits.amax(-1) + 1
            logits = logits.to(dtype)
            yield _elementwise_case("token_confidence", label, confidence.fused_token_confidence,
                                    confidence.token_confidence, (logits,), {},
                                    confidence.token_confidence_bytes(logits))
            block_len = min(rows, 32)
            # every position still masked (a block's first step): the bytes model is then exact
            block0 = torch.full((rows // block_len, block_len), mask_id, device=device, dtype=torch.int64)
            batched = logits[: block0.numel()].view(*block0.shape, vocab)
            yield _selection_case("confidence_threshold_select", label,
                                  confidence.confidence_threshold_select, confidence.threshold_select,
                                  batched, block0, mask_id, 0.9)
            k = torch.full((block0.shape[0],), 2, device=device, dtype=torch.int64)
            yield _selection_case("confidence_topk_select", label, confidence.confidence_topk_select,
                                  confidence.topk_select, batched, block0, mask_id, k)


def _time_cpu(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def rotated_inputs(args: tuple, min_bytes: int, max_copies: int = 512) -> list[tuple]:
    """args and copies of it whose tensors together hold at least min_bytes (up to max_copies sets).
    Calling a kernel on the sets in turn makes each call read its inputs from HBM, not from an L2
    cache still holding them from the previous replay. The cap keeps graph capture quick; it binds
    only below ~400 KB per set (e.g. 32 x 2048 rows), where 512 sets still exceed an H100's L2.
    Copies keep the strides of views (a step's k and v are column slices of the fused QKV output):
    a clone would make them contiguous, and every set but the first would time another layout."""
    size = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    copies = min(max_copies, max(1, -(-min_bytes // max(size, 1))))
    return [args] + [tuple(replica(a) if isinstance(a, torch.Tensor) else a for a in args)
                     for _ in range(copies - 1)]


def host_us(fn, args: tuple, calls: int = 100, trials: int = 5) -> float:
    """Host time per call (Python wrapper + launch), calls enqueued back to back without a sync:
    what a non-graph step pays per op when the GPU work is shorter than the launch."""
    fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        samples.append((time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def _time_cuda(fn, sets: list[tuple]) -> tuple[float, float, float]:
    """(median us with Python launches, median us replayed from a CUDA graph, host us per call).
    do_bench flushes L2 before each call; the graph replays the calls over rotating input sets
    (rotated_inputs), so neither can report more than HBM bandwidth for inputs L2 could hold."""
    args = sets[0]
    launched = triton.testing.do_bench(lambda: fn(*args), warmup=10, rep=50, return_mode="median") * 1e3
    return launched, graph_us(fn, sets), host_us(fn, args)


def graph_us(fn, sets: list[tuple]) -> float:
    """Median us per call of fn replayed over `sets` from a CUDA graph (nan if it cannot be captured)."""
    def replay():
        for call_args in sets:
            fn(*call_args)

    try:
        return triton.testing.do_bench_cudagraph(replay, rep=50, return_mode="median") * 1e3 / len(sets)
    except Exception:  # not capturable (e.g. a host sync); reported as missing
        return float("nan")


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


def run(quick: bool, compile_baseline: bool, only: list[str] | None, rows_only: list[int] | None = None) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and compile_baseline:
        print("note: no torch.compile timings on CPU (inductor's C++ build per shape would dominate the run)")
        compile_baseline = False
    torch._dynamo.config.recompile_limit = 1024  # one static compile per shape, never an eager fallback
    name, slug = device_label(device)
    bandwidth = copy_bandwidth(device)
    # graph timings rotate over input sets of >= 4x the L2 size (H100: 50 MB)
    rotation_bytes = 4 * torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbs": round(bandwidth, 1), "quick": quick,
            "timer": "do_bench median (L2 flushed) + do_bench_cudagraph median over input sets of >= 4x L2, "
                     "the faster of two passes in opposite provider orders + host time per back-to-back call"
                     if device == "cuda" else "perf_counter median"}
    if device == "cpu":
        meta["note"] = "Triton interpreter on CPU: checks that the benchmark runs; the timings mean nothing"
        print(meta["note"])
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for case in build_cases(device, torch.bfloat16, quick, rows_only):
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
            providers["compile"] = torch.compile(case.eager, dynamic=False)
        sets = rotated_inputs(case.args, rotation_bytes) if device == "cuda" else [case.args]
        if device == "cuda":
            timings = {provider: _time_cuda(fn, sets) for provider, fn in providers.items()}
            # A second graph pass in the opposite order, keeping each provider's faster pass, so the
            # order favours none.
            for provider in reversed(list(providers)):
                us, us_graph, us_host = timings[provider]
                timings[provider] = (us, min(us_graph, graph_us(providers[provider], sets)), us_host)
        else:
            timings = {provider: (_time_cpu(lambda fn=fn, args=case.args: fn(*args), 3), float("nan"), float("nan"))
                       for provider, fn in providers.items()}
        for provider, (us, us_graph, us_host) in timings.items():
            best = us if math.isnan(us_graph) else min(us, us_graph)
            row = {"pattern": case.pattern, "shape": case.shape, "provider": provider, "us": round(us, 2),
                   "us_graph": round(us_graph, 2), "us_host": round(us_host, 2), "us_best": round(best, 2),
                   "bytes": case.bytes_moved, "gbs": round(case.bytes_moved / best / 1e3, 1),
                   "of_copy_bw": round(case.bytes_moved / best / 1e3 / bandwidth, 3), "checked": checked}
            rows.append(row)
            print(f"{case.pattern:28s} {case.shape:14s} {provider:8s} {us:8.1f} us  graph {us_graph:8.1f} us"
                  f"  host {us_host:6.1f} us  {row['gbs']:8.1f} GB/s  ({row['of_copy_bw']:.0%} of copy)")
        del sets
        fused_us = rows[-len(providers)]["us_best"]
        ratios = "  ".join(f"vs {r['provider']} {r['us_best'] / fused_us:.2f}x" for r in rows[-len(providers) + 1:])
        print(f"{'':28s} {'':14s} fused speed-up {ratios}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = ("-" + "-".join(only) if only else "") + ("-rows" + "-".join(map(str, rows_only)) if rows_only else "")
    stem = RESULTS / f"kernels-{slug}{partial}"  # partial runs do not clobber
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
    parser.add_argument("--rows", type=_row_counts, default=None,
                        help="comma-separated token rows to run, e.g. 32,4096 (default 32,256,1024,4096; quick 5)")
    args = parser.parse_args(argv)
    with serial_launches():
        run(args.quick, not args.no_compile, args.only, args.rows)


def _row_counts(text: str) -> list[int]:
    try:
        rows = [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts, got {text!r}") from None
    if any(r < 1 for r in rows):
        raise argparse.ArgumentTypeError(f"row counts must be positive, got {text!r}")
    return rows


if __name__ == "__main__":
    main()
