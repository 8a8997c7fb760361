"""Sweep the vocabulary-pass plan (splits, block_v) of the confidence kernels at dLLM shapes.

    python -m bench.tune_confidence            # CUDA: ~2 minutes on an H100
    python -m bench.tune_confidence --quick    # tiny shapes; runs under the Triton interpreter on CPU
    python -m bench.tune_confidence --grid "TILE_ROWS=2,4,8 WARP_VALUES=1024,2048" --default-plan-only

Prints GPU time (CUDA graph over rotating input copies of >= 4x L2, as bench.kernels) and the
share of copy bandwidth for every plan, the wrapper's default plan marked with '*', so the
defaults in plan_vocab_pass can be set from measurements; with --grid, for every combination of
those constants of patterns/confidence.py.
"""
from __future__ import annotations

import argparse
import itertools

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch
import triton

from bench.kernels import copy_bandwidth, rotated_inputs
from bench.tune_launch import parse_grid
from difuse.patterns import confidence


def _plans(quick: bool) -> list[tuple[int | None, int | None]]:
    if quick:
        return [(None, None), (1, 1024), (2, 512)]
    return [(None, None), (1, 2048), (1, 4096), (1, 8192), (2, 4096), (2, 8192), (4, 4096), (8, 2048),
            (16, 2048), (16, 4096)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--grid", type=parse_grid, default={},
                        help='module constants of patterns/confidence.py to sweep, e.g. "TILE_ROWS=2,4,8"')
    parser.add_argument("--default-plan-only", action="store_true", help="time only the wrapper's own plan")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: the sampling pass (Gumbel race)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.grid if not hasattr(confidence, name)]
    if unknown:
        raise SystemExit(f"--grid: patterns/confidence.py has no constant {', '.join(unknown)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device)
    rotation = 4 * torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    shapes = [(5, 3000)] if args.quick else [(32, 126464), (256, 126464), (4096, 126464), (4096, 157184)]
    plans = [(None, None)] if args.default_plan_only else _plans(args.quick)
    defaults = {name: getattr(confidence, name) for name in args.grid}
    for rows, vocab in shapes:
        logits = (torch.randn(rows, vocab, device=device) * 4).to(torch.bfloat16)
        block = torch.full((rows // min(rows, 32), min(rows, 32)), 7, device=device)
        sets = rotated_inputs((logits, block), rotation) if device == "cuda" else [(logits, block)]
        default = confidence.plan_vocab_pass(rows, vocab, logits.device)
        nbytes = confidence.confidence_select_bytes(logits, block)
        for values in itertools.product(*args.grid.values()):
            setting = dict(zip(args.grid, values))
            for name, value in setting.items():
                setattr(confidence, name, value)
            label = " ".join(f"{name}={value}" for name, value in setting.items())
            for splits, block_v in plans:
                plan = confidence.plan_vocab_pass(rows, vocab, logits.device, splits, block_v)
                mark = "*" if plan == default and setting == defaults else " "

                def step(splits=splits, block_v=block_v, sets=sets, vocab=vocab):
                    for lg, bl in sets:
                        bl.fill_(7)  # every position masked again: accepted tokens were written in place
                        confidence.confidence_threshold_select(lg.view(*bl.shape, vocab), bl, 7, 0.9,
                                                               args.temperature, splits=splits, block_v=block_v)

                if device == "cuda":
                    us = triton.testing.do_bench_cudagraph(step, rep=50, return_mode="median") * 1e3 / len(sets)
                else:
                    step()
                    us = float("nan")
                print(f"{rows:5d}x{vocab:<7d} splits {plan[0]:3d} block_v {plan[1]:5d} {mark} {us:8.1f} us "
                      f"{nbytes / us / 1e3 / bandwidth:6.0%} of copy  {label}", flush=True)
        for name, value in defaults.items():
            setattr(confidence, name, value)


if __name__ == "__main__":
    main()
