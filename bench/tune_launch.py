"""Sweep the named launch constants of the step kernels: patterns.attention (BLOCK_KEYS,
PROGRAMS_PER_SM, NUM_WARPS, NUM_STAGES, MERGE_LOADS), patterns.rope (TILE_VALUES,
VALUES_PER_WARP, ..., shared by rope, rope_kv_write and their QK-norm forms; NORM_TILE_VALUES is
qk_norm_rope's tile), patterns.linear (BLOCK_N, BLOCK_K, NUM_STAGES, SPLITS_UNTIL_PROGRAMS),
patterns.rms_norm (ROW_VALUES, VALUES_PER_WARP, STREAM_HINTS, WEIGHT_FIRST, shared by rms_norm
and add_rms_norm), patterns.swiglu (MAX_BLOCK, VALUES_PER_WARP, STREAM_HINTS) and patterns.moe
(BLOCK_M_FEW, BLOCK_K_FEW, STAGES_FEW, ..._MANY: the grouped GEMMs' rows per program and tiles),
with torch.compile of the reference alongside.

    python -m bench.tune_launch [attention] [rope] [linear] [norm] [swiglu] [moe]   # CUDA: ~3 minutes each on an H100
    python -m bench.tune_launch --quick              # tiny shapes, two settings; the CPU interpreter works
    python -m bench.tune_launch linear --grid "BLOCK_K=64,128 NUM_STAGES=3,4"   # a grid of your own

GPU time is measured as in bench.kernels (CUDA graph over rotating input copies of >= 4x L2,
kernels launched serially); the six best settings are printed per shape, so the module defaults can
be set from measurements.
"""
from __future__ import annotations

import argparse
import itertools
import math

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts)
import torch
import triton

from bench.kernels import _cache_write_case, _time_cpu, graph_us, rotated_inputs
from bench.moe import ROUTINGS
from difuse.fusion.launch import serial_launches
from difuse.patterns import _rows, add_rms_norm, attention, kv_write, linear, moe, qk_norm, rms_norm, rope, swiglu
from difuse.patterns.moe_router import softmax_topk_router


def _graph_us(fn, sets) -> float:
    return graph_us(fn, sets) if torch.cuda.is_available() else _time_cpu(lambda: fn(*sets[0]), 1)


GRID_OVERRIDE: dict | None = None  # --grid: replaces every tuner's grid


def parse_grid(text: str) -> dict:
    """"NAME=v1,v2 NAME2=v3" -> {NAME: [v1, v2], NAME2: [v3]}, numbers as int where they are."""
    grid = {}
    for item in text.split():
        name, _, values = item.partition("=")
        if not name.isupper() or not values:
            raise argparse.ArgumentTypeError(f"expected NAME=v1,v2,... with an upper-case module constant, got {item!r}")
        grid[name] = [float(v) if "." in v else int(v) for v in values.split(",")]
    return grid


def _forget_plans(module) -> None:
    if hasattr(module, "_PLANS"):  # plans hold the launch shape
        module._PLANS = _rows.PlanCache()


def sweep(title: str, fused, reference, args: tuple, module, grid: dict, nbytes: int,
          others: dict | None = None, compile_reference: bool = True) -> None:
    """Time `fused` under every combination of the module constants in `grid`, then restore them.
    `others`: more baselines (name -> function of args) timed alongside eager and compile."""
    if GRID_OVERRIDE is not None:
        unknown = [name for name in GRID_OVERRIDE if not hasattr(module, name)]
        if unknown:
            raise SystemExit(f"--grid: {module.__name__} has no constant {', '.join(unknown)}")
        grid = GRID_OVERRIDE
    cuda = torch.cuda.is_available()
    sets = rotated_inputs(args, 4 * torch.cuda.get_device_properties(0).L2_cache_size) if cuda else [args]
    baseline = f"eager {_graph_us(reference, sets):.2f} us"
    if cuda and compile_reference:
        baseline += f", compile {_graph_us(torch.compile(reference, dynamic=False), sets):.2f} us"
    if cuda:
        baseline += "".join(f", {name} {_graph_us(fn, sets):.2f} us" for name, fn in (others or {}).items())
    print(f"== {title}: {baseline}", flush=True)
    defaults = {name: getattr(module, name) for name in grid}
    results, failed = [], 0
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        for name, value in setting.items():
            setattr(module, name, value)
        _forget_plans(module)
        us = _graph_us(fused, sets)
        if math.isnan(us):  # did not compile or launch, e.g. more shared memory than an SM has
            failed += 1
        else:
            results.append((us, setting))
    for name, value in defaults.items():
        setattr(module, name, value)
    _forget_plans(module)
    ranked = sorted(results, key=lambda r: r[0])
    shown = ranked[:6] + [r for r in ranked[6:] if r[1] == defaults]
    for us, setting in shown:
        mark = "*" if setting == defaults else " "
        print(f" {mark}{us:8.2f} us {nbytes / us / 1e3:7.0f} GB/s  " + " ".join(f"{k}={v}" for k, v in setting.items()),
              flush=True)
    if failed:
        print(f"  ({failed} settings did not compile or launch on the device)", flush=True)


def tune_attention(quick: bool, opts: dict) -> None:
    """LLaDA-8B's heads over a 768-token cache at batch 1 and 8, and LLaDA2-mini's grouped heads over
    4096 keys at batch 1: more key slices than the merge loads at once (MERGE_LOADS)."""
    head_dim, block = (32, 4) if quick else (128, 32)
    cases = [(1, 4, 4, 40)] if quick else [(1, 32, 32, 768), (8, 32, 32, 768), (1, 16, 4, 4096)]
    for batch, heads, kv_heads, context in cases:
        q = torch.randn(batch, block, heads, head_dim, **opts).transpose(1, 2)
        k, v = (torch.randn(batch, kv_heads, context, head_dim, **opts) for _ in range(2))
        bias = torch.zeros(batch, 1, 1, context, **opts)
        bias[0, ..., :16] = torch.finfo(bias.dtype).min
        grid = dict(BLOCK_KEYS=[32, 64], NUM_STAGES=[2]) if quick else dict(
            BLOCK_KEYS=[32, 64, 128], PROGRAMS_PER_SM=[1, 2, 4, 8], NUM_WARPS=[4, 8], NUM_STAGES=[2, 3])
        sweep(f"attention {batch}x{block}x{context}", attention.fused_attention, attention.attention_reference,
              (q, k, v, bias), attention, grid, attention.attention_bytes(q, k, v, bias))


def tune_rope(quick: bool, opts: dict, rows_list: tuple = (32, 4096)) -> None:
    heads, head_dim = (4, 32) if quick else (32, 128)
    for rows in (5,) if quick else rows_list:
        x = torch.randn(1, rows, heads, head_dim, **opts)
        cache_write = _cache_write_case(rows, heads, head_dim, rows + 512, opts)  # as bench.kernels times it
        k, cos, sin, where, keys, values, v = cache_write.args
        weight = torch.randn(head_dim, **opts)
        if quick:
            grid = dict(TILE_VALUES=[1024, 4096])
        elif rows > 1024:
            grid = dict(TILE_VALUES=[2048, 4096, 8192, 16384], VALUES_PER_WARP=[512, 1024], PROGRAMS_PER_SM=[4, 8])
        else:
            grid = dict(MIN_PROGRAMS_PER_SM=[1, 2, 4, 8], VALUES_PER_WARP=[256, 512, 1024])
        # qk_norm_rope (no cache write) takes its tile from NORM_TILE_VALUES.
        norm_grid = {("NORM_TILE_VALUES" if name == "TILE_VALUES" else name): values for name, values in grid.items()}
        label = f"{rows}x{heads}x{head_dim}"
        sweep(f"rope {label}", rope.fused_apply_rope, rope.apply_rope, (x, cos, sin), rope, grid,
              rope.rope_bytes(x, cos, sin))
        sweep(f"rope_kv_write {label}", kv_write.fused_rope_kv_write, kv_write.rope_kv_write,
              cache_write.args, rope, grid, cache_write.bytes_moved)
        sweep(f"qk_norm_rope {label}", qk_norm.fused_qk_norm_rope, qk_norm.qk_norm_rope, (x, weight, 1e-6, cos, sin),
              rope, norm_grid, qk_norm.qk_norm_rope_bytes(x, weight, 1e-6, cos, sin))
        sweep(f"qk_norm_rope_kv_write {label}", kv_write.fused_qk_norm_rope_kv_write, kv_write.qk_norm_rope_kv_write,
              (k, weight, cos, sin, where, keys, values, v, 1e-6), rope, grid,
              kv_write.kv_write_bytes(k, cos, where, keys, v, weight))


def tune_linear(quick: bool, opts: dict, rows_list: tuple = (32, 128)) -> None:
    """LLaDA-8B's projections (QKV, attention out, gate_up, FFN down; the LM head at 32 rows) over
    `rows_list` token rows (a 32-token block at batch 1 is 32), against cuBLAS as torch calls it and
    with the operands swapped."""
    shapes = [(5, 96, 80)] if quick else [
        (rows, n, k) for rows in rows_list
        for n, k in ((12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (126464, 4096))
        if rows == 32 or n < 100_000]
    grid = dict(BLOCK_K=[32, 64]) if quick else dict(
        BLOCK_K=[64, 128, 256], NUM_STAGES=[2, 3, 5], SPLITS_UNTIL_PROGRAMS=[0.5, 1, 2])  # BLOCK_N 128 never won
    for rows, n, k in shapes:
        x, w = torch.randn(rows, k, **opts), torch.randn(n, k, **opts) / k**0.5
        sweep(f"linear {rows}x{n}x{k}", linear.fused_linear, linear.linear, (x, w), linear, grid,
              linear.linear_bytes(x, w), others={"cuBLAS swapped": lambda x, w: torch.mm(w, x.t())})


def tune_norm(quick: bool, opts: dict) -> None:
    """RMSNorm and Add+RMSNorm over 4096 rows of LLaDA-8B's and LLaDA-MoE's hidden sizes."""
    shapes = [(5, 64)] if quick else [(4096, 4096), (4096, 2048)]
    grid = dict(ROW_VALUES=[32, 64]) if quick else dict(ROW_VALUES=[1024, 2048, 4096],
                                                        VALUES_PER_WARP=[128, 256, 512, 1024, 2048])
    for rows, hidden in shapes:
        x, residual, weight = torch.randn(rows, hidden, **opts), torch.randn(rows, hidden, **opts), \
            torch.randn(hidden, **opts)
        sweep(f"rms_norm {rows}x{hidden}", rms_norm.fused_rms_norm, rms_norm.rms_norm, (x, weight, 1e-6),
              rms_norm, grid, rms_norm.rms_norm_bytes(x, weight))
        sweep(f"add_rms_norm {rows}x{hidden}", add_rms_norm.fused_add_rms_norm, add_rms_norm.add_rms_norm,
              (x, residual, weight, 1e-6), rms_norm, grid, add_rms_norm.add_rms_norm_bytes(x, residual, weight))


def tune_swiglu(quick: bool, opts: dict) -> None:
    """SwiGLU from two tensors and from one packed gate_up at LLaDA-8B's FFN width, at a batch-1
    step's 32 rows and at 4096."""
    shapes = [(5, 96)] if quick else [(32, 12288), (4096, 12288)]
    grid = dict(VALUES_PER_WARP=[32, 64]) if quick else dict(MAX_BLOCK=[1024, 2048, 4096],
                                                             VALUES_PER_WARP=[128, 256, 512])
    for rows, width in shapes:
        gate, up, gate_up = (torch.randn(rows, w, **opts) for w in (width, width, 2 * width))
        sweep(f"swiglu {rows}x{width}", swiglu.fused_swiglu, swiglu.swiglu, (gate, up), swiglu, grid,
              swiglu.swiglu_bytes(gate, up))
        sweep(f"swiglu_packed {rows}x{2 * width}", swiglu.fused_swiglu_packed, swiglu.swiglu_fused, (gate_up,),
              swiglu, grid, swiglu.swiglu_packed_bytes(gate_up))


def tune_moe(quick: bool, opts: dict) -> None:
    """Routed experts at LLaDA-MoE's shapes (hidden 2048, inner 1024, 64 experts, top 8) over one
    decode block (32 tokens) and sixteen (512), routed two ways: spread over most experts, and
    skewed onto about twelve, as bench.step's random-weight model routes. Against the dense
    PyTorch form (every expert on every token); no compiled baseline (64 experts unrolled)."""
    hidden, inner, experts, top_k = (32, 16, 8, 2) if quick else (2048, 1024, 64, 8)
    generator = torch.Generator().manual_seed(0)
    w13 = (torch.randn(experts, 2 * inner, hidden, generator=generator) / hidden**0.5).to(**opts)
    w2 = (torch.randn(experts, hidden, inner, generator=generator) / inner**0.5).to(**opts)
    for tokens in (5,) if quick else (32, 512):
        if quick:
            grid = dict(BLOCK_M_FEW=[16, 32])
        elif tokens * top_k <= moe.FEW_SLOTS:
            grid = dict(BLOCK_M_FEW=[16, 32, 64], BLOCK_K_FEW=[64, 128], STAGES_FEW=[2, 3])
        else:
            grid = dict(BLOCK_M_MANY=[32, 64, 128], DOWN_BLOCK_N_MANY=[64, 128], STAGES_MANY=[3, 4])
        x = torch.randn(tokens, hidden, generator=generator).to(**opts)
        for routing, skew in ROUTINGS.items():
            bias = skew * torch.randn(experts, generator=generator)  # favoured experts
            logits = torch.randn(tokens, experts, generator=generator) + bias
            weights, ids = softmax_topk_router(logits.to(opts["device"]), top_k)
            args = (x, w13, w2, weights, ids)
            hit = torch.unique(ids).numel()
            sweep(f"moe {tokens}x{hidden} {routing}, {hit} of {experts} experts", moe.fused_moe,
                  moe.moe_dense_reference, args, moe, grid, moe.moe_bytes(*args), compile_reference=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tuners = {"attention": tune_attention, "rope": tune_rope, "linear": tune_linear, "norm": tune_norm,
              "swiglu": tune_swiglu, "moe": tune_moe}
    parser.add_argument("kernels", nargs="*", help=f"any of {', '.join(tuners)} (default: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--linear-rows", default="32,128", help="comma-separated token rows of the linear sweep")
    parser.add_argument("--rope-rows", default="32,4096", help="comma-separated positions of the rope sweeps")
    parser.add_argument("--grid", type=parse_grid, default=None,
                        help='"NAME=v1,v2 NAME2=v3": sweep these module constants instead of the built-in grid')
    args = parser.parse_args(argv)
    kernels = args.kernels or list(tuners)
    if set(kernels) - set(tuners):
        parser.error(f"unknown kernels {sorted(set(kernels) - set(tuners))}: choose from {', '.join(tuners)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = dict(device=device, dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu-interpreter (timings mean nothing)'}  "
          f"torch {torch.__version__}  triton {triton.__version__}   * = the module's default")
    # One static compile of each reference per shape: past dynamo's default 8 recompiles the
    # compile baseline would silently run eager.
    torch._dynamo.config.recompile_limit = 1024
    global GRID_OVERRIDE
    GRID_OVERRIDE = args.grid
    try:
        with serial_launches():
            for name in kernels:
                if name in ("linear", "rope"):
                    rows = getattr(args, f"{name}_rows")
                    tuners[name](args.quick, opts, tuple(int(r) for r in rows.split(",")))
                else:
                    tuners[name](args.quick, opts)
    finally:
        GRID_OVERRIDE = None


if __name__ == "__main__":
    main()
