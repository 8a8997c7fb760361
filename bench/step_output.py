"""Outputs of the denoise-step benchmark: CSV and JSON rows, the ms-per-step plot with the floors,
the fusion report files, and the tables printed at the end of a run."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

CONFIGS = ("eager", "graph", "fused_graph", "compile")
# compile before the graph captures: a capture that fails is the likeliest thing to leave the
# device in a bad state, so it goes after what it could spoil
RUN_ORDER = ("eager", "compile", "graph", "fused_graph")
LABELS = {"eager": "eager runtime step (no fusion, no graph)", "graph": "difuse unfused + CUDA graph",
          "fused_graph": "difuse fused + CUDA graph", "compile": 'torch.compile(mode="reduce-overhead")'}


def fusion_summary(report: dict) -> list[dict]:
    """Per pattern / generic group kind: groups, how many fused, and the profiled fused vs fallback
    time summed over the groups the profile rule timed (microseconds per call of each group)."""
    by_name: dict[str, dict] = {}
    for group in report["groups"]:
        entry = by_name.setdefault(group["name"], {"name": group["name"], "groups": 0, "fused": 0, "timed": 0,
                                                   "fused_us": 0.0, "fallback_us": 0.0})
        entry["groups"] += 1
        entry["fused"] += bool(group["decision"])
        if group["t_fused"] and group["t_fallback"]:
            entry["timed"] += 1
            entry["fused_us"] += group["t_fused"] * 1e6
            entry["fallback_us"] += group["t_fallback"] * 1e6
    return sorted(by_name.values(), key=lambda e: -e["fallback_us"])


def fusion_table(summary_rows: list[dict]) -> str:
    lines = [f"{'group':<22} {'groups':>6} {'fused':>5} {'timed':>5} {'fused us':>10} {'fallback us':>11}"]
    for e in summary_rows:
        lines.append(f"{e['name']:<22} {e['groups']:>6} {e['fused']:>5} {e['timed']:>5} "
                     f"{e['fused_us']:>10.1f} {e['fallback_us']:>11.1f}")
    return "\n".join(lines)


CSV_FIELDS = ["model", "device", "batch", "config", "label", "status", "median_ms", "p10_ms", "p90_ms", "samples",
              "steps_per_s", "tokens_per_step", "tokens_per_s", "block_tokens_per_s", "weight_bytes", "kv_bytes",
              "weight_floor_ms", "memory_floor_ms", "x_weight_floor", "x_memory_floor", "flops", "achieved_tflops",
              "matmul_fraction", "matmul_fraction_sustained", "cublas_gemm_ms", "x_cublas_gemm", "sm_clock_mhz",
              "power_w", "clock_limited", "clock_reasons", "clock_samples", "routed_experts_per_layer", "graph", "compile_s",
              "peak_memory_gb", "wall_s", "notes", "error"]


def write_outputs(out: Path, stem: str, meta: dict, rows: list[dict], reports: dict) -> list[Path]:
    """CSV and JSON of every row, the plot, and per batch size the fusion report (table and PNG)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = out / f"{stem}.csv", out / f"{stem}.json", out / f"{stem}.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fusion = {batch: {"summary": fusion_summary(report.to_dict()), "report": report.to_dict()}
              for batch, report in reports.items()}
    json_path.write_text(json.dumps({**meta, "rows": rows, "fusion_reports": fusion}, indent=1, default=str))
    paths = [csv_path, json_path]
    for batch, report in reports.items():
        table_path = out / f"{stem}-fusion-b{batch}.txt"
        table_path.write_text(f"{report}\n")
        paths.append(table_path)
        if any(g.t_fused and g.t_fallback for g in report.groups):
            report.save_png(out / f"{stem}-fusion-b{batch}.png")
            paths.append(out / f"{stem}-fusion-b{batch}.png")
    if plot(png_path, meta, rows):
        paths.append(png_path)
    return paths


def plot(path: Path, meta: dict, rows: list[dict]) -> bool:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in CONFIGS:
        mine = [r for r in ok if r["config"] == name]
        if mine:
            ax.plot(*zip(*sorted((r["batch"], r["median_ms"]) for r in mine)), marker="o", label=mine[0]["label"])
    floors = sorted({(r["batch"], r["weight_floor_ms"], r["memory_floor_ms"]) for r in ok})
    batches = [f[0] for f in floors]
    ax.plot(batches, [f[1] for f in floors], "k--", label="weight-streaming floor")
    ax.plot(batches, [f[2] for f in floors], "k:", label="weights + KV-cache floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("ms per denoise step (median)")
    ax.set_title(f"{meta['model']} denoise step, {meta['environment']['device']}\n"
                 f"prompt {meta['prompt']}, gen {meta['gen']}, block {meta['block']}, dual cache", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def clock(sample: dict, prefix: str = "") -> str:
    """The median SM clock while timing, '*' when a power or thermal limit held it down in some
    samples, '-' when nothing was sampled."""
    mhz = sample.get(prefix + "sm_clock_mhz")
    if mhz is None:
        return "-"
    return f"{mhz:.0f}" + ("*" if sample.get(prefix + "clock_limited") else "")


def table(rows: list[dict], tokens_per_step: float) -> str:
    head = (f"{'B':>3} {'configuration':<12} {'ms/step':>9} {'steps/s':>8} {'tok/s@' + format(tokens_per_step, 'g'):>9} "
            f"{'blk tok/s':>10} {'xWfloor':>7} {'xWKVfl':>7} {'MMfrac':>6} {'MMsust':>6} {'xGEMM':>6} {'SM MHz':>7}"
            "  graph / status")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["batch"], CONFIGS.index(r["config"]))):
        if r["status"] != "ok":
            lines.append(f"{r['batch']:>3} {r['config']:<12} {r['status'].upper():>9}  {r['error'][:90]}")
            continue
        graph = r["graph"] if len(r["graph"]) < 40 else r["graph"][:37] + "..."
        compile_s = f", compiled in {r['compile_s']:.0f} s" if r.get("compile_s") else ""
        x_gemm = f"{r['x_cublas_gemm']:6.2f}" if r.get("x_cublas_gemm") is not None else f"{'-':>6}"
        lines.append(f"{r['batch']:>3} {r['config']:<12} {r['median_ms']:9.3f} {r['steps_per_s']:8.1f} "
                     f"{r['tokens_per_s']:9.0f} {r['block_tokens_per_s']:10.0f} {r['x_weight_floor']:7.2f} "
                     f"{r['x_memory_floor']:7.2f} {r['matmul_fraction']:6.1%} {r['matmul_fraction_sustained']:6.1%} "
                     f"{x_gemm} {clock(r):>7}  "
                     f"{graph}{compile_s}")
    return "\n".join(lines)


def print_summary(meta, rows, accountings, ceilings, paths) -> None:
    env = meta["environment"]
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    print(f"\n{meta['model']} denoise step on {env['device']} (torch {env['torch']}, triton {env['triton']}), "
          f"prompt {meta['prompt']} + gen {meta['gen']}, block {meta['block']}, dual cache, {meta['dtype']}")
    print(f"ceilings (this run): copy {ceilings['copy_bandwidth_Bps'] / 1e12:.3f} TB/s, "
          f"matmul {ceilings['matmul_flops'] / 1e12:.1f} TFLOP/s (SM MHz {clock(ceilings, 'matmul_')}), "
          f"sustained {ceilings['matmul_flops_sustained'] / 1e12:.1f} TFLOP/s "
          f"(SM MHz {clock(ceilings, 'matmul_sustained_')})")
    for batch, a in sorted(accountings.items()):
        if not a:
            continue
        routed = (f", routed experts/layer {a['routed_experts_per_layer']:.1f} of {a['experts_per_layer']}"
                  if a["routed_experts_per_layer"] is not None else "")
        bandwidth = ceilings["copy_bandwidth_Bps"]
        gemm = f"; cuBLAS GEMMs alone {a['cublas_gemm_ms']:.3f} ms" if a.get("cublas_gemm_ms") is not None else ""
        print(f"  B={batch:<3} weights read {a['weight_bytes'] / 1e9:.2f} GB -> floor "
              f"{a['weight_bytes'] / bandwidth * 1e3:.3f} ms; + KV {a['kv_bytes'] / 1e9:.2f} GB -> "
              f"{(a['weight_bytes'] + a['kv_bytes']) / bandwidth * 1e3:.3f} ms; {a['flops'] / 1e12:.2f} TFLOP"
              f"{routed}{gemm}")
    print("xWfloor = ms/step over the weight-streaming floor; xWKVfl = over the weights + KV-cache floor; "
          "MMfrac = model FLOP/s over the measured matmul rate (a burst), MMsust = over the rate sustained "
          f"for {ceilings['matmul_sustain_s']:g} s; xGEMM = over the step's nn.Linear matmuls "
          "alone (cuBLAS); SM MHz = median SM clock while timing (nvidia-smi), * = a power or thermal limit "
          "active in some samples")
    print(table(rows, meta["tokens_per_step"]))
    sys.stdout.flush()
