"""End-to-end generation benchmark through the Engine: eager vs fused step, without and with
CUDA graphs, on one random LLaDA checkpoint in the real HF format.

    python -m bench.generate --quick                       # tiny model, CPU-friendly (interpreter kernels)
    python -m bench.generate                               # CUDA: LLaDA-8B layer dims, 4 layers
    python -m bench.generate --layers 32 --cache dual --decoder threshold --threshold 0.9

Each variant warms up with one generation (recording, kernel compilation, graph capture), then
times `--repeats` generations. Random weights are unconfident, so the threshold decoder commits
about one token per step: ms/step is the figure to compare, reported as a ratio to eager within
this run on the named device.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch

from difuse.models import load_model, make_tiny_checkpoint
from difuse.runtime import Engine, GenerationConfig


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _checkpoint(args, folder: str) -> str:
    if args.model:
        return args.model
    dims = dict(d_model=args.hidden, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
                mlp_hidden_size=args.inter, vocab_size=args.vocab, embedding_size=args.vocab,
                max_sequence_length=max(4096, args.prompt_length + args.gen_length))
    return str(make_tiny_checkpoint(folder, kind="llada", dtype=torch.bfloat16, **dims))


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: a random one with the dims below)")
    parser.add_argument("--quick", action="store_true", help="tiny dims and lengths")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--inter", type=int, default=12288)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--decoder", default="threshold")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--cache", default="dual")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.heads, args.inter, args.layers, args.vocab = 64, 4, 96, 2, 320
        args.prompt_length, args.gen_length, args.block_length, args.repeats = 8, 8, 4, 1
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, decoder=args.decoder,
                              threshold=args.threshold, cache=args.cache, early_stop=False, batch_size=args.batch,
                              steps=args.gen_length if args.decoder in ("fixed", "random") else None)
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(_checkpoint(args, folder), args.device, dtype)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (args.batch, args.prompt_length), generator=generator).tolist()
    variants = [("eager", False, False), ("fused", True, False)]
    if args.device == "cuda":
        variants += [("eager + graphs", False, True), ("fused + graphs", True, True)]
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {dtype}, "
          f"layers {args.layers}, hidden {args.hidden}, vocab {args.vocab}, prompt {args.prompt_length}, "
          f"gen {args.gen_length}, block {args.block_length}, batch {args.batch}, cache {args.cache}, "
          f"decoder {args.decoder}")
    print(f"{'variant':16} {'ms/step':>9} {'tokens/s':>9} {'steps':>6} {'vs eager':>9}  tokens match eager")
    baseline, reference = None, None
    for name, fusion, graphs in variants:
        engine = Engine(model, enable_fusion=fusion, cuda_graphs=graphs)
        engine.generate(prompts, config)  # warm-up: record, compile, capture
        times, results = [], None
        for _ in range(args.repeats):
            _sync(args.device)
            start = time.perf_counter()
            results = engine.generate(prompts, config)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        forwards = engine.last_stats["forwards"]
        ms_per_step = seconds * 1e3 / forwards
        tokens = [r.sequence for r in results]
        baseline = baseline or ms_per_step
        reference = reference or tokens
        print(f"{name:16} {ms_per_step:9.3f} {args.batch * args.gen_length / seconds:9.1f} {forwards:6d} "
              f"{baseline / ms_per_step:8.2f}x  {tokens == reference}")
        if engine.last_stats["graph_capture_errors"]:
            print("  graph capture failed:", engine.last_stats["graph_capture_errors"])


if __name__ == "__main__":
    main()
