"""The targets the kernel and step benchmarks are held to, checked against their JSON results.

    python -m bench.verdict bench/results/kernels-<device>-rows32-4096.json \
                            bench/results/step-llada-8b-<device>.json

Kernels (`python -m bench.kernels --rows 32,4096`): at 4096 token rows and more, every fused
pattern reaches 85% of the copy bandwidth measured in the same run and is no slower than
torch.compile; confidence selection over 32 x 126464 logits takes at most 20 us of GPU time.
Step (`python -m bench.step`): at batch 1 the fused + CUDA graph step is within 1.10x the
weight-streaming floor; at every batch it is 1.5x faster than eager and no slower than
torch.compile; at batch 16 it is faster than the unfused captured step; at batch 16 and 64 the
model FLOP/s reach 70% of the matmul rate. Each line prints the measured figures; the exit status
is 1 when any target is missed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

MIN_COPY_FRACTION = 0.85
BANDWIDTH_ROWS = 4096
CONFIDENCE_SHAPE, CONFIDENCE_MAX_US = "32x126464", 20.0
MAX_WEIGHT_FLOOR_RATIO = 1.10
MIN_EAGER_SPEEDUP = 1.5
COMPUTE_BOUND_BATCHES, MIN_MATMUL_FRACTION = (16, 64), 0.70
# Timings closer than this are a tie, not "slower": both kernels at the copy bandwidth can differ by
# a few hundredths of a microsecond in one run (packed SwiGLU at 4096 rows, 70.77 against 70.76 us,
# kernels-NVIDIA-H200-rows4096.json).
TIE = 0.005


def token_rows(pattern: str, shape: str) -> int:
    """Token rows of a bench.kernels shape label: attention's is sequences x block x context."""
    dims = [int(d) for d in shape.split("x")]
    return dims[0] * dims[1] if pattern == "attention" else dims[0]


def gpu_us(result: dict) -> float:
    """Time inside a CUDA graph where measured, else the best time."""
    graph = result.get("us_graph")
    return graph if graph is not None and not math.isnan(graph) else result["us_best"]


def kernel_checks(results: list[dict]) -> list[tuple[bool, str]]:
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        by_case.setdefault((r["pattern"], r["shape"]), {})[r["provider"]] = r
    checks = []
    for (pattern, shape), providers in by_case.items():
        fused = providers.get("fused")
        if fused is None or token_rows(pattern, shape) < BANDWIDTH_ROWS:
            continue
        line = f"{pattern} {shape}: {fused['of_copy_bw']:.0%} of copy bandwidth"
        ok = fused["of_copy_bw"] >= MIN_COPY_FRACTION and fused.get("checked", "ok") == "ok"
        if "compile" in providers:
            compiled = providers["compile"]["us_best"]
            ok = ok and fused["us_best"] <= compiled * (1 + TIE)
            line += f", {fused['us_best']:.2f} against torch.compile {compiled:.2f} us"
            if compiled < fused["us_best"] <= compiled * (1 + TIE):
                line += f" (a tie: within {TIE:.1%})"
        else:
            line += ", no torch.compile timing"
            ok = False
        if fused.get("checked", "ok") != "ok":
            line += f", {fused['checked']}"
        checks.append((ok, line))
    selection = by_case.get(("confidence_threshold_select", CONFIDENCE_SHAPE), {}).get("fused")
    if selection is None:
        checks.append((False, f"confidence selection {CONFIDENCE_SHAPE}: not in the results (run --rows 32)"))
    else:
        us = gpu_us(selection)
        checks.append((us <= CONFIDENCE_MAX_US,
                       f"confidence selection {CONFIDENCE_SHAPE}: {us:.1f} us (target {CONFIDENCE_MAX_US:g})"))
    if not any(token_rows(p, s) >= BANDWIDTH_ROWS for p, s in by_case):
        checks.append((False, f"no pattern at {BANDWIDTH_ROWS} rows in the results (run --rows 32,4096)"))
    return checks


def step_checks(step: dict) -> list[tuple[bool, str]]:
    rows = {(r["batch"], r["config"]): r for r in step["rows"] if r.get("status") == "ok"}
    batches = sorted({batch for batch, _ in rows})
    checks = []

    def ms(batch, config):
        r = rows.get((batch, config))
        return r["median_ms"] if r else None

    one = rows.get((1, "fused_graph"))
    if one is None:
        checks.append((False, "batch 1 fused + graph: not in the results"))
    else:
        checks.append((one["x_weight_floor"] <= MAX_WEIGHT_FLOOR_RATIO,
                       f"batch 1 fused + graph: {one['median_ms']:.3f} ms, {one['x_weight_floor']:.2f}x the "
                       f"weight floor of {one['weight_floor_ms']:.3f} ms (target {MAX_WEIGHT_FLOOR_RATIO:.2f}x)"))
    for batch in batches:
        fused, eager, compiled = ms(batch, "fused_graph"), ms(batch, "eager"), ms(batch, "compile")
        if fused is None or eager is None or compiled is None:
            checks.append((False, f"batch {batch}: fused + graph, eager and torch.compile not all measured"))
            continue
        checks.append((eager / fused >= MIN_EAGER_SPEEDUP and fused <= compiled * (1 + TIE),
                       f"batch {batch}: fused + graph {fused:.3f} ms, {eager / fused:.2f}x faster than eager "
                       f"({eager:.3f}), torch.compile {compiled:.3f} ms"))
    unfused = ms(16, "graph")
    if ms(16, "fused_graph") is None or unfused is None:
        checks.append((False, "batch 16: fused and unfused captured steps not both measured"))
    else:
        fused = ms(16, "fused_graph")
        checks.append((fused < unfused, f"batch 16: fused + graph {fused:.3f} ms against unfused + graph "
                                        f"{unfused:.3f} ms, {unfused / fused - 1:+.1%} faster"))
    for batch in COMPUTE_BOUND_BATCHES:
        r = rows.get((batch, "fused_graph"))
        if r is None:
            checks.append((False, f"batch {batch} fused + graph: not in the results"))
            continue
        sustained = r.get("matmul_fraction_sustained")
        checks.append((r["matmul_fraction"] >= MIN_MATMUL_FRACTION,
                       f"batch {batch} fused + graph: model FLOP/s {r['matmul_fraction']:.0%} of the burst "
                       f"matmul rate" + (f" ({sustained:.0%} of the sustained)" if sustained else "")
                       + f", target {MIN_MATMUL_FRACTION:.0%}"))
    return checks


def step_throughput(step: dict) -> list[str]:
    return [f"batch {r['batch']:>3} fused + graph: {r['tokens_per_s']:.0f} tokens/s at "
            f"{r['tokens_per_step']:g} tokens per step per sequence"
            for r in sorted(step["rows"], key=lambda r: r["batch"])
            if r["config"] == "fused_graph" and r.get("status") == "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench.kernels and/or bench.step JSON files")
    args = parser.parse_args(argv)
    missed = 0
    for path in args.results:
        data = json.loads(path.read_text())
        if "results" in data:
            title, checks, notes = f"kernels on {data['meta']['device']}", kernel_checks(data["results"]), []
        elif "rows" in data:
            device = next((r["device"] for r in data["rows"] if r.get("device")), "?")
            title, checks, notes = f"{data['model']} step on {device}", step_checks(data), step_throughput(data)
        else:
            parser.error(f"{path}: neither a bench.kernels nor a bench.step result")
        print(f"== {title} ({path.name})")
        for ok, line in checks:
            print(f"  {'met   ' if ok else 'MISSED'}  {line}")
        for line in notes:
            print(f"          {line}")
        missed += sum(not ok for ok, _ in checks)
    print(f"{missed} target(s) missed" if missed else "every target met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
