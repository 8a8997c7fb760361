"""A/B runs of the denoise step: one bench.step configuration under settings you name, each run in
a fresh process, the settings interleaved over rounds so that drift in time favours none.

    python -m bench.ab "DIFUSE_PDL=0" "DIFUSE_PDL=1"                          # environment variables
    python -m bench.ab "" "difuse.patterns.linear.NUM_STAGES=4" --rounds 3   # module constants ("" = as is)
    python -m bench.ab ... --model llada-8b --batch 1 --config fused_graph --iters 100
    python -m bench.ab "" "DIFUSE_PDL=0" --quick --config eager             # tiny shapes (CPU smoke run)

Against another revision of difuse: install its tree beside this one and put it first on the path,
e.g. `git archive REV fusion patterns models runtime pyproject.toml README.md | tar -x -C /tmp/old`,
`pip install --no-deps --no-build-isolation --target /tmp/old-site /tmp/old`, then the setting
"PYTHONPATH=/tmp/old-site:$PYTHONPATH" (bench/results/ab-llada-8b-b1-fused_graph.log was run so).

A setting is space-separated NAME=VALUE items: an upper-case NAME without dots is an environment
variable, a dotted name a module constant set after import (ints, floats, True/False parsed). Each
setting keeps its own kernel and decision cache across its rounds, so one setting's profile
decisions never serve another. Prints every run's median ms/step and each setting's median over its
rounds against the first setting's; writes the table and a chart of every run to
<out>/ab-<model>-b<batch>-<config>.{log,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.step_model import SPECS
from bench.step_output import RUN_ORDER

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Runs in the child: set the module constants, then run bench.step.
_CHILD = """
import importlib, json, sys
for name, value in json.loads(sys.argv[1]).items():
    module_name, _, constant = name.rpartition(".")
    module = importlib.import_module(module_name)
    if not hasattr(module, constant):
        raise SystemExit(f"bench.ab: {module_name} has no constant {constant}")
    setattr(module, constant, value)
from bench import step
raise SystemExit(step.main(sys.argv[2:]))
"""


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> tuple[dict, dict]:
    """"DIFUSE_PDL=0 difuse.patterns.linear.BLOCK_K=64" -> (environment, module constants)."""
    env, constants = {}, {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE items, got {item!r}")
        if "." in name:
            constants[name] = _value(value)
        elif name.isupper():
            env[name] = value
        else:
            raise argparse.ArgumentTypeError(
                f"{name!r} is neither an environment variable (upper case) nor a module constant (dotted path)")
    return env, constants


def run_once(setting: str, cache_dir: Path, step_args: list[str], config: str, batch: int) -> float:
    """Median ms/step of one bench.step run under `setting` (nan, with the reason printed, if none)."""
    env, constants = parse_setting(setting)
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(constants), *step_args, "--out", out],
            env={**os.environ, "DIFUSE_CACHE_DIR": str(cache_dir), **env}, capture_output=True, text=True)
        rows = []
        for path in Path(out).glob("step-*.json"):
            rows += [r for r in json.loads(path.read_text())["rows"] if r["config"] == config and r["batch"] == batch]
    if done.returncode != 0 or not rows or rows[0]["status"] != "ok":
        reason = rows[0]["error"] if rows else (done.stderr.strip().splitlines() or ["no result"])[-1]
        print(f"    {setting or '(as is)'}: no measurement: {reason}", flush=True)
        return float("nan")
    return rows[0]["median_ms"]


def _median(values: list[float]) -> float:
    measured = [v for v in values if v == v]  # nan: a run without a measurement
    return statistics.median(measured) if measured else float("nan")


def plot(times: dict[str, list[float]], names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(names)))
    for row, (name, runs) in enumerate(zip(names, times.values())):
        ax.plot(runs, [row] * len(runs), "o", color="tab:blue", alpha=0.6, label="run" if row == 0 else None)
        ax.plot([_median(runs)], [row], "|", color="black", markersize=18, label="median" if row == 0 else None)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.4, -0.6)  # first setting on top
    ax.set_xlabel("ms per denoise step (median of the run)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help='settings to compare, e.g. "" "DIFUSE_PDL=0"')
    parser.add_argument("--model", choices=sorted(SPECS), default="llada-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--config", choices=RUN_ORDER, default="fused_graph")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="timed steps per run (bench.step's default)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for setting in args.settings:
        try:
            parse_setting(setting)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    step_args = ["--model", args.model, "--batch", str(args.batch), "--configs", args.config]
    step_args += (["--iters", str(args.iters)] if args.iters else []) + (["--quick"] if args.quick else [])
    names = [s or "(as is)" for s in args.settings]
    width = max(len(n) for n in names)
    lines = [f"$ python -m bench.ab {' '.join(repr(s) for s in args.settings)} --model {args.model} "
             f"--batch {args.batch} --config {args.config} --rounds {args.rounds}"
             f"{' --quick' if args.quick else ''}   ({time.strftime('%Y-%m-%d', time.gmtime())})"]
    print(lines[0], flush=True)
    times: dict[str, list[float]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as caches:
        for round_ in range(args.rounds):
            for i, setting in enumerate(args.settings):
                ms = run_once(setting, Path(caches) / str(i), step_args, args.config, args.batch)
                times[setting].append(ms)
                lines.append(f"round {round_}  {names[i]:<{width}}  {ms:9.3f} ms/step")
                print(lines[-1], flush=True)
    first = _median(times[args.settings[0]])
    lines.append(f"{'setting':<{width}}  median ms/step  vs first")
    for name, setting in zip(names, args.settings):
        ms = _median(times[setting])
        lines.append(f"{name:<{width}}  {ms:14.3f}  {ms / first:8.3f}x")
    print("\n".join(lines[-len(args.settings) - 1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ab-{args.model}-b{args.batch}-{args.config}"
    stem.with_suffix(".log").write_text("\n".join(lines) + "\n")
    plot(times, names, f"{args.model}, batch {args.batch}, {args.config}: {args.rounds} rounds, interleaved",
         stem.with_suffix(".png"))
    print(f"wrote {stem}.log, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
