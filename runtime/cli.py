"""Command line: `difuse generate`, `difuse report` and `difuse serve` (also `python -m difuse.runtime`)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from difuse.runtime.config import CACHES, DECODERS, ITERATIONS, GenerationConfig, iteration_and_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difuse", description="Block-diffusion generation with fused kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text for a prompt")
    report = commands.add_parser("report", help="generate once with fusion on and print the fusion report")
    for sub in (generate, report):
        sub.add_argument("--model", help="checkpoint folder (default: the built-in model)")
        sub.add_argument("--prompt", required=True, action="append",
                         help="prompt text; repeat the option for a batch")
        sub.add_argument("--no-chat", action="store_true", help="encode the prompt without the chat template")
        sub.add_argument("--gen-length", type=int, help="default: the model's generation_config.json, else 64")
        sub.add_argument("--block-length", type=int, help="default: the model's generation_config.json, else 32")
        sub.add_argument("--steps", type=int, help="steps of the fixed/random schedule")
        sub.add_argument("--decoder", choices=DECODERS, default="threshold")
        sub.add_argument("--threshold", type=float, default=0.9)
        sub.add_argument("--low-threshold", type=float, default=0.4)
        sub.add_argument("--temperature", type=float, default=0.0)
        sub.add_argument("--cache", choices=CACHES, help="default: prefix with block_diffusion, else none")
        sub.add_argument("--iteration", choices=ITERATIONS,
                         help="default: block_diffusion for block-causal models (LLaDA2), else blockwise")
        sub.add_argument("--unroll", type=int, help="steps per host check (default: from masks left)")
        sub.add_argument("--no-early-stop", action="store_true")
        sub.add_argument("--seed", type=int)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
        # tensor / expert parallelism: launch with torchrun --nproc-per-node N and pass N
        sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size: 1 or the number of processes")
        sub.add_argument("--ep", type=int, default=1, help="expert-parallel size: 1 or the number of processes")
    generate.add_argument("--no-fusion", action="store_true", help="run the denoise step eagerly")
    generate.add_argument("--no-cuda-graph", action="store_true")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    report.add_argument("--html", help="also write the report as an HTML page here")
    report.add_argument("--png", help="also write the report's bar chart here")
    # serve parses its own options (runtime/server.py) so that generate never imports the web stack
    commands.add_parser("serve", add_help=False, help="OpenAI-compatible HTTP server (see difuse serve --help)")
    return parser


def _config(args) -> GenerationConfig:
    from difuse.models import default_model_path, generation_defaults

    # Lengths the checkpoint was trained for fill in what the user left open.
    trained = generation_defaults(args.model or default_model_path())
    gen_length = args.gen_length or trained.get("gen_length", 64)
    block_length = args.block_length or trained.get("block_length", min(32, gen_length))
    steps = args.steps or (trained.get("steps") if args.decoder in ("fixed", "random") else None)
    iteration, cache = iteration_and_cache(args.iteration, args.cache, trained)
    return GenerationConfig(
        gen_length=gen_length, block_length=block_length, decoder=args.decoder, steps=steps,
        threshold=args.threshold, low_threshold=args.low_threshold, temperature=args.temperature,
        cache=cache, iteration=iteration, unroll=args.unroll, early_stop=not args.no_early_stop,
        seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, serve_args = parser.parse_known_args(argv)
    if args.command == "serve":
        from difuse.runtime.server import main as serve

        return serve(serve_args)
    if serve_args:
        parser.error(f"unrecognized arguments: {' '.join(serve_args)}")
    from difuse.runtime.engine import Engine

    try:
        config = _config(args)
        fusion = args.command == "report" or not args.no_fusion
        graphs = args.command == "report" or not args.no_cuda_graph
        engine = Engine.from_pretrained(args.model, args.device, DTYPES.get(args.dtype), fusion, graphs,
                                        tensor_parallel=args.tp, expert_parallel=args.ep)
        results = engine.generate(args.prompt, config, chat=not args.no_chat)
    except ValueError as error:
        print(f"difuse: error: {error}", file=sys.stderr)
        return 2
    if _leave_process_group() > 0:  # every rank generated the same tokens; rank 0 alone prints them
        return 0
    if args.command == "report":
        return _report(engine, args)
    for result in results:
        if args.json:
            print(json.dumps({"text": result.text, "tokens": result.tokens, "steps": result.steps,
                              "tokens_per_step": result.tokens_per_step, "ms_per_step": result.ms_per_step,
                              "cache_refreshes": result.cache_refreshes, "fusion": engine.enable_fusion,
                              "device": str(engine.device)}))
        else:
            print(result.text)
            print(f"[{result.steps} steps, {result.tokens_per_step:.2f} tokens/step, "
                  f"{result.ms_per_step:.2f} ms/step, {result.cache_refreshes} cache refreshes]", file=sys.stderr)
    return 0


def _leave_process_group() -> int:
    """This process's rank; the process group is torn down first, after a barrier, because a gloo
    group still alive at interpreter exit can abort the process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank


def _report(engine, args) -> int:
    report = engine.fusion_report()
    print(report)
    if args.html:
        report.save_html(args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.png:
        report.save_png(args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
