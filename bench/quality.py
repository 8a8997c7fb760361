"""Decoder quality benchmark: accuracy and tokens per step of every decoder x cache mode on the
built-in model's held-out arithmetic problems, through difuse.runtime.Engine.

    python -m bench.quality [--model DIR] [--n 1000] [--device cuda] [--no-fusion]

Problems: `n` held-out problems (a fixed seed; the hash split keeps them out of training).
A reply is right when it is exactly the integer. Tokens per step = committed tokens / denoise
steps over all problems (EOS padding counts as committed tokens, as in the runtime's stats).
Writes bench/results/quality-<device>.csv (-nofusion.csv unfused) and a speed-quality plot next to it.
On a CPU-only machine fused kernels run under Triton's interpreter (minutes per setting): check
the bench there with `--no-fusion --n 16`.
"""
import argparse
import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import difuse.fusion  # noqa: F401  first: picks Triton's CPU interpreter before torch imports triton
from bench import arith_task
from difuse.models import default_model_path, generation_defaults
from difuse.runtime.config import GenerationConfig
from difuse.runtime.engine import Engine

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
CACHES = ("none", "prefix", "dual")
DECODERS = ("fixed", "threshold", "hierarchy", "credit")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setting:
    decoder: str
    threshold: float | None  # the threshold decoder's sweep; None: the decoder's defaults

    @property
    def label(self) -> str:
        return self.decoder if self.threshold is None else f"{self.decoder} {self.threshold}"


def settings(decoders: list[str]) -> list[Setting]:
    out = []
    for decoder in decoders:
        if decoder == "threshold":
            out += [Setting(decoder, t) for t in THRESHOLDS]
        else:
            out.append(Setting(decoder, None))
    return out


def generation_config(setting: Setting, cache: str, gen_length: int, block_length: int, batch_size: int):
    options = dict(gen_length=gen_length, block_length=block_length, decoder=setting.decoder, cache=cache,
                   batch_size=batch_size)
    if setting.decoder == "fixed":
        options["steps"] = gen_length  # LLaDA's reference: one token per step
    if setting.threshold is not None:
        options["threshold"] = setting.threshold
    return GenerationConfig(**options)


def device_slug(device: str) -> str:
    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def evaluate(engine: Engine, problems, config: GenerationConfig) -> dict:
    prompts = [arith_task.question(*p) for p in problems]
    engine.generate(prompts[:config.batch_size], config)  # warm-up: recording, compiling, graph capture
    start = time.perf_counter()
    results = engine.generate(prompts, config)
    wall_s = time.perf_counter() - start
    correct = sum(arith_task.parse_answer(r.text) == arith_task.solution(*p) for r, p in zip(results, problems))
    steps = sum(r.steps for r in results)
    committed = sum(r.tokens_per_step * r.steps for r in results)
    return {"accuracy": correct / len(problems), "tokens_per_step": committed / max(steps, 1),
            "steps_per_problem": steps / len(problems), "forwards": engine.last_stats["forwards"],
            "wall_s": wall_s, "problems_per_s": len(problems) / wall_s}


def run(model: Path, n: int, device: str, enable_fusion: bool, decoders: list[str], caches: list[str],
        batch_size: int, gen_length: int | None, block_length: int | None, log=print) -> list[dict]:
    defaults = generation_defaults(model)
    gen_length = gen_length or defaults.get("gen_length")
    block_length = block_length or defaults.get("block_length")
    if gen_length is None or block_length is None:
        raise ValueError(f"{model} has no generation_config.json: pass --gen-length and --block-length")
    problems = arith_task.held_out_problems(n)
    engine = Engine.from_pretrained(str(model), device=device, enable_fusion=enable_fusion)
    rows = []
    for setting in settings(decoders):
        for cache in caches:
            config = generation_config(setting, cache, gen_length, block_length, batch_size)
            row = {"decoder": setting.decoder, "threshold": setting.threshold, "cache": cache,
                   "fusion": enable_fusion, **evaluate(engine, problems, config)}
            rows.append(row)
            log(f"{setting.label:15s} cache {cache:6s}  accuracy {row['accuracy']:.3f}  "
                f"tokens/step {row['tokens_per_step']:.2f}  {row['problems_per_s']:,.1f} problems/s")
    return rows


def write_csv(rows: list[dict], path: Path, context: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*context, *rows[0]])
        writer.writeheader()
        for row in rows:
            writer.writerow({**context, **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"none": "o", "prefix": "s", "dual": "^"}
    colours = {"fixed": "tab:gray", "threshold": "tab:blue", "hierarchy": "tab:green", "credit": "tab:red"}
    fig, axis = plt.subplots(figsize=(7.5, 5))
    for cache in markers:
        for decoder in colours:
            points = sorted((r["tokens_per_step"], r["accuracy"], r["threshold"]) for r in rows
                            if r["cache"] == cache and r["decoder"] == decoder)
            if not points:
                continue
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers[cache], color=colours[decoder],
                      linestyle="-" if decoder == "threshold" else "", label=f"{decoder}, cache {cache}")
            if decoder == "threshold" and cache == "none":
                for x, y, t in points:
                    axis.annotate(f"{t}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("tokens per step")
    axis.set_ylabel("held-out accuracy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--n", type=int, default=1000, help="held-out problems")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-fusion", dest="fusion", action="store_false", help="run the engine unfused")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--batch-size", type=int, default=250,
                        help="problems decoded together (1000 / 250: equal chunks)")
    parser.add_argument("--gen-length", type=int, default=None, help="default: the model's generation_config.json")
    parser.add_argument("--block-length", type=int, default=None, help="default: the model's generation_config.json")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    if model is None:
        parser.error("no built-in model yet: train it with `python -m bench.train_tiny --out models/builtin` "
                     "or pass --model DIR")
    rows = run(model, args.n, args.device, args.fusion, args.decoders, args.caches, args.batch_size,
               args.gen_length, args.block_length)
    slug = device_slug(args.device)
    context = {"device": slug, "model": Path(model).name, "problems": args.n}
    csv_path = args.out_dir / f"quality-{slug}{'' if args.fusion else '-nofusion'}.csv"
    write_csv(rows, csv_path, context)
    plot(rows, csv_path.with_suffix(".png"),
         f"decoders on {args.n} held-out problems, {slug}, fusion {'on' if args.fusion else 'off'}")
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
