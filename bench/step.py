"""Denoise-step benchmark against the weight-streaming floor.

    python -m bench.step [--model llada-8b|llada-moe-7b|llada2-mini|tiny] [--batch 1,4,16,64] [--quick]
                         [--configs eager,graph,fused_graph,compile] [--out DIR]

Random bf16 weights at the model's real shapes, built on the GPU. Prompt 512, generation 256,
block 32, dual KV cache filled once by a full refresh forward; what is timed is the steady-state
cached step of the first generation block: forward over the block's 32 tokens per sequence (their
K/V written into the cache, attention over the whole cached sequence), LM head on the block rows,
threshold confidence selection, token write. Before every timed step (outside the timed region)
the block is reset to the same half-decoded state (every other position masked, the average state
while a block decodes), so every step does the same work; for a dense model the work of a step
does not depend on the tokens at all, for MoE the routing does. LLaDA2 runs its block-causal form: the block attends to
the prefix up to its own end (the keys after it carry the padding bias).

Configurations, all in one process on the same weights, cache and step tensors:
    eager        the runtime's denoise step called directly (no fusion, no graph)
    graph        difuse StepRunner, unfused, CUDA graph
    fused_graph  difuse StepRunner with the FusionScheduler (profile rule on), CUDA graph
    compile      torch.compile(mode="reduce-overhead") of the same step function (once per batch)
On a CPU (and with --quick) the shapes are tiny, `graph` and `compile` are skipped (they need
CUDA graphs) and `fused_graph` runs fused without a graph. MoE models run their experts through
difuse.models' default dispatch (sync-free fused Triton kernels on CUDA); a step that still
synchronises with the host (found with CUDA's sync debug mode) is not captured: `graph` is skipped
and `fused_graph` runs without a graph, each saying why. Configurations run in the order eager,
compile, graph, fused_graph, the largest batch first, then the others from the smallest up.

Every number is relative to ceilings measured in the same run (bench/ceilings.py): the weight
floor is the bytes of weights one step must read over the copy bandwidth; for MoE only the
experts the step's tokens were routed to count (the union over the batch, per layer). For a dense
model the step's nn.Linear matmuls are also timed alone through cuBLAS at the step's shapes
(xGEMM: the step over that time), which bounds what fusing the rest can gain once the step is
compute-bound.
Writes step-<model>-<device>.{csv,json,png} and the fusion report tables to --out.
"""
from __future__ import annotations

import argparse
import gc
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import difuse.fusion  # noqa: F401 - before anything imports Triton: CPU-only hosts need its interpreter switch
from torch._dynamo.utils import counters  # noqa: E402 - imports Triton

from bench.ceilings import measure_ceilings, summary, synchronize, time_calls
from bench.gpu_clocks import ClockSampler, nvidia_smi_gpu
from bench.kernels import graph_us, rotated_inputs
from bench.step_model import (SPECS, TINY_OF, LinearCalls, RoutedExperts, StepGeometry, build_random_model,
                              kv_cache_bytes, model_dims, step_accounting)
from bench.step_output import (CONFIGS, LABELS, RUN_ORDER, clock, fusion_summary, fusion_table,
                               print_summary, write_outputs)
from difuse.models.moe import Experts
from difuse.runtime.capture import StepRunner
from difuse.runtime.config import GenerationConfig
from difuse.runtime.decoders import make_decoder
from difuse.runtime.kv_cache import StaticKVCache
from difuse.runtime.step import make_denoise_step

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_start = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _start:7.1f}s] {message}", flush=True)


class StepState:
    """The static tensors of one batch size's cached step of the first generation block, shared by
    every configuration: tokens [prompt | MASK * gen], positions, key bias, row tensors, decoder
    thresholds and counters, and the dual KV cache, filled by one refresh forward."""

    def __init__(self, model, batch: int, prompt: int, gen: int, block: int, block_causal: bool,
                 device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.batch = model, device, batch
        self.mask_id = model.config.mask_token_id
        config = GenerationConfig(gen_length=gen, block_length=block, decoder="threshold", threshold=0.9,
                                  cache="dual", prompt_multiple=1)
        self.decoder = make_decoder(config, self.mask_id)
        dims, length = model_dims(model), prompt + gen
        self.block_start, self.block_end = prompt, prompt + block
        generator = torch.Generator(device=device).manual_seed(batch)

        def random_ids(count):  # any id but the mask
            ids = torch.randint(0, dims["vocab"] - 1, (batch, count), device=device, generator=generator)
            return ids + (ids >= self.mask_id).long()

        self.tokens = torch.full((batch, length), self.mask_id, dtype=torch.int64, device=device)
        self.tokens[:, :prompt] = random_ids(prompt)
        # a half-decoded block, the average state during decoding: every other position still masked
        self.block_template = torch.where(torch.arange(block, device=device) % 2 == 0, self.mask_id, random_ids(block))
        self.positions = torch.arange(length, device=device).expand(batch, length).contiguous()
        self.key_bias = torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
        self.keys = length
        if block_causal:  # the active block sees the prefix and itself, never later blocks
            self.key_bias[..., self.block_end:] = torch.finfo(dtype).min
            self.keys = self.block_end

        def rows(start, count):
            return torch.arange(start, start + count, device=device)

        self.query_rows, self.block_in_query, self.block_rows = rows(prompt, block), rows(0, block), rows(prompt, block)
        self.threshold = torch.tensor(0.9, dtype=torch.float32, device=device)
        self.low_threshold = torch.tensor(0.4, dtype=torch.float32, device=device)
        self.steps_taken = torch.zeros(batch, dtype=torch.int64, device=device)
        self.committed = torch.zeros(batch, dtype=torch.int64, device=device)
        decoder_state = self.decoder.init_state(batch, block, dims["vocab"], device)
        self.state_names = tuple(sorted(decoder_state))
        self.cache = StaticKVCache(dims["layers"], batch, dims["kv_heads"], length, dims["head_dim"], dtype, device)
        self.args = (self.tokens, self.positions, self.key_bias, self.query_rows, self.block_in_query,
                     self.block_rows, self.threshold, self.low_threshold, self.steps_taken, self.committed,
                     *(decoder_state[name] for name in self.state_names))
        self.geometry = StepGeometry(batch, block, block, self.keys, length)
        self._fill_cache(length, prompt, block)
        self.host_sync = self._host_sync()

    def step_function(self):
        """A fresh denoise step over this state's tensors (cached, no smoothing)."""
        return make_denoise_step(self.model, self.decoder, self.cache, self.state_names, smooth=False)

    def reset_block(self) -> None:
        self.tokens[:, self.block_start:self.block_end].copy_(self.block_template)

    def static_tensors(self) -> list[torch.Tensor]:
        return [t for t in self.args if isinstance(t, torch.Tensor)] + self.cache.keys + self.cache.values

    def _host_sync(self) -> str | None:
        """Why the step cannot be captured in a CUDA graph (the first host-synchronising call of
        one eager step, e.g. MoE's reference dispatch reading expert counts), or None. Found
        with CUDA's sync debug mode rather than by a failing capture, which can leave the
        allocator's capture state behind for the configurations after it."""
        if self.device.type != "cuda":
            return None
        step = self.step_function()
        step(*self.args)  # first use of this shape (kernel compilation, autotuning) stays outside the check
        self.reset_block()
        torch.cuda.synchronize(self.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(*self.args)
        except RuntimeError as error:
            return _first_line(error)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            self.reset_block()
        return None

    def _fill_cache(self, length: int, prompt: int, block: int) -> None:
        """One refresh step: every row's K/V into the cache, as at the start of a block."""
        every_row = torch.arange(length, device=self.device)
        block_in_sequence = torch.arange(prompt, prompt + block, device=self.device)
        refresh_args = (self.args[:3] + (every_row, block_in_sequence) + self.args[5:])
        self.step_function()(*refresh_args)
        self.reset_block()


class Configuration:
    """Builds the callable of one configuration on a StepState, and what to record about it."""

    def __init__(self, name: str, state: StepState, device: torch.device):
        self.name, self.state, self.device = name, state, device
        self.label = LABELS[name]
        self.notes: list[str] = []
        self.compile_s: float | None = None
        self._skips_before: int | None = None  # inductor's cudagraph-skip counter before compiling
        self.runner: StepRunner | None = None
        self.scheduler = None
        self._disabled: list[Experts] = []

    def build(self):
        on_cuda = self.device.type == "cuda"
        if self.name == "eager":
            fn, args = self.state.step_function(), self.state.args
            return lambda: fn(*args)
        if self.name == "compile":
            return self._compiled()
        if self.name == "fused_graph":
            from difuse.fusion import FusionConfig, FusionScheduler

            self.scheduler = FusionScheduler(FusionConfig(profile=True))
            if not on_cuda:
                self.label = "difuse fused (no CUDA graph on a CPU)"
            elif self.state.host_sync is not None:
                self.label = "difuse fused (no CUDA graph: the step syncs with the host)"
                self.notes.append(f"not capturable, host sync: {self.state.host_sync}")
        use_graph = on_cuda and self.state.host_sync is None
        self.runner = StepRunner(f"bench-{self.name}", self.state.step_function(), self.state.args,
                                 self.scheduler, use_cuda_graph=use_graph)
        return self.runner

    def warmup_calls(self, base: int) -> int:
        """Untimed calls: a runner's own warm-up (and capture) calls come on top of `base`."""
        if self.runner is not None:
            return self.runner.warm_up_calls + int(self.runner.use_cuda_graph) + base
        return base

    def graph_status(self) -> str:
        if self.name == "compile":
            if self._skips_before is None:
                return "none"
            skips = counters["inductor"]["cudagraph_skips"] - self._skips_before
            return ("cudagraph trees" if skips == 0 else
                    f"cudagraphs skipped for {skips} compiled graph(s): TORCH_LOGS=cudagraphs says why")
        if self.runner is None or not self.runner.use_cuda_graph:
            return "none"
        if self.runner.graph is not None:
            return "captured"
        return f"capture failed, ran eagerly: {self.runner.capture_error}"

    def _compiled(self):
        """torch.compile of the step, compiled and run once here (timed as compile_s). If tracing
        through an MoE expert dispatch fails, it is compiled again with the dispatch left eager
        (torch.compiler.disable), and the note says so."""
        try:
            return self._compile_and_run()
        except Exception as error:  # noqa: BLE001 - retried once without the expert dispatch
            experts = [m for m in self.state.model.modules() if isinstance(m, Experts)]
            if not experts:
                raise
            self.notes.append(f"compiling through the MoE expert dispatch failed ({type(error).__name__}: "
                              f"{_first_line(error)[:200]}); compiled again with it left eager")
        for module in experts:
            module.forward = torch.compiler.disable(module.forward)
        self._disabled = experts
        return self._compile_and_run()

    def _compile_and_run(self):
        state = self.state
        torch._dynamo.reset()  # a static compile for this batch size, not a recompile of the last one
        for tensor in state.static_tensors():
            torch._dynamo.mark_static_address(tensor)  # in-place updated buffers: no cudagraph input copies
        compiled = torch.compile(state.step_function(), mode="reduce-overhead", dynamic=False)
        args = state.args

        def call():
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args)

        self._skips_before = counters["inductor"]["cudagraph_skips"]
        begin = time.perf_counter()
        call()  # compile (and the cudagraph warm-up run)
        synchronize(self.device)
        self.compile_s = time.perf_counter() - begin
        return call

    def release(self) -> None:
        for experts in self._disabled:
            del experts.forward  # back to the class's forward
        self._disabled = []
        if self.name == "compile":
            torch._dynamo.reset()
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
        self.runner = None
        self.scheduler = None


def skip_reason(name: str, device: torch.device) -> str | None:
    if device.type != "cuda" and name in ("graph", "compile"):
        return "needs CUDA graphs: the device is a CPU"
    return None


def run_configuration(name: str, state: StepState, settings, accounting: dict, ceilings: dict):
    """(result row, the FusionReport of the fused configuration or None)."""
    row = {"config": name, "label": LABELS[name], "batch": state.batch, "status": "ok", "error": "",
           "graph": "", "compile_s": None, "notes": ""}
    device, report = state.device, None
    reason = skip_reason(name, device)
    if name == "graph" and state.host_sync is not None:
        reason = f"not capturable: the step synchronises with the host ({state.host_sync})"
    if reason is not None:
        return {**row, "status": "skipped", "error": reason}, None
    config, call = Configuration(name, state, device), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    try:
        call = config.build()
        clocks = ClockSampler(nvidia_smi_gpu(device))
        times = time_calls(call, device, warmup=config.warmup_calls(settings.warmup), iters=settings.iters,
                           before=state.reset_block, sampler=clocks)
        row.update(summary(times))
        row.update(clocks.summary())
        row.update(throughput(row["median_ms"], state, settings, accounting, ceilings))
        if config.scheduler is not None:
            report = config.scheduler.report()
    except torch.cuda.OutOfMemoryError as error:
        row.update(status="oom", error=_first_line(error))
    except Exception as error:  # noqa: BLE001 - one failing configuration must not end the run
        row.update(status="error", error=f"{type(error).__name__}: {_first_line(error)}",
                   traceback=traceback.format_exc())
    finally:
        row["graph"] = config.graph_status()
        row["compile_s"] = config.compile_s
        row["notes"] = "; ".join(config.notes)
        row["label"] = config.label
        row["wall_s"] = time.perf_counter() - begin
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        call = None  # holds the runner (its CUDA graph and pool) or the compiled function
        try:
            config.release()
        except Exception as error:  # noqa: BLE001 - the row is measured; what follows is recorded on its own
            log(f"releasing {name} failed: {type(error).__name__}: {_first_line(error)}")
        release_memory(device)
    return row, report


def throughput(median_ms: float, state: StepState, settings, accounting: dict, ceilings: dict) -> dict:
    seconds = median_ms / 1e3
    bandwidth, rate = ceilings["copy_bandwidth_Bps"], ceilings["matmul_flops"]
    weight_floor_ms = accounting["weight_bytes"] / bandwidth * 1e3
    memory_floor_ms = (accounting["weight_bytes"] + accounting["kv_bytes"]) / bandwidth * 1e3
    return {"steps_per_s": 1 / seconds,
            "tokens_per_s": state.batch * settings.tokens_per_step / seconds,
            "block_tokens_per_s": state.batch * state.geometry.block / seconds,
            "x_weight_floor": median_ms / weight_floor_ms,
            "x_memory_floor": median_ms / memory_floor_ms,
            "achieved_tflops": accounting["flops"] / seconds / 1e12,
            "matmul_fraction": accounting["flops"] / seconds / rate,
            "matmul_fraction_sustained": accounting["flops"] / seconds / ceilings["matmul_flops_sustained"],
            "x_cublas_gemm": median_ms / accounting["cublas_gemm_ms"] if accounting["cublas_gemm_ms"] else None}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:400] if text else type(error).__name__


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError as error:  # a device error from the configuration just run: it is recorded there
            log(f"releasing memory failed: {_first_line(error)}")


def eager_census(model, state: StepState) -> tuple[list[int] | None, dict]:
    """One eager step of this batch, outside timing: the distinct experts per MoE layer (None for a
    dense model) and the step's nn.Linear calls by shape."""
    with RoutedExperts(model) as routed, LinearCalls(model) as linears:
        state.step_function()(*state.args)
        state.reset_block()
    return (list(routed.union) if routed.experts else None), dict(linears.calls)


def cublas_gemm_ms(calls: dict, device: torch.device) -> float:
    """GPU ms of a dense step's nn.Linear matmuls run alone through cuBLAS (torch.mm replayed from a
    CUDA graph over inputs rotated past L2): the step's matmul work with nothing around it."""
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    total_us = 0.0
    for (rows, in_features, out_features, dtype), count in calls.items():
        x = torch.randn(rows, in_features, device=device, dtype=dtype)
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
        total_us += count * graph_us(lambda x, w: torch.mm(x, w.t()), rotated_inputs((x, weight), 4 * l2_bytes))
    return total_us / 1e3


def run_batch(model, spec, batch: int, settings, ceilings: dict, budget: "Budget"):
    """All configurations at one batch size: (rows, accounting, FusionReport or None)."""
    device, dtype = settings.device, settings.dtype
    length = settings.prompt + settings.gen
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cache_bytes = kv_cache_bytes(model, batch, length, dtype)
        if cache_bytes > 0.9 * free:
            reason = f"does not fit: the KV cache needs {cache_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
            return [_skipped(name, batch, reason) for name in settings.configs], {}, None
    state, failure = None, None
    try:
        state = StepState(model, batch, settings.prompt, settings.gen, settings.block, spec.block_causal, device, dtype)
        union, linear_calls = eager_census(model, state)
        accounting = step_accounting(model, state.geometry, union)
        # MoE experts are not nn.Linear: only a dense step's matmuls are all timed.
        accounting["cublas_gemm_ms"] = cublas_gemm_ms(linear_calls, device) \
            if device.type == "cuda" and union is None else None
    except torch.cuda.OutOfMemoryError as error:
        failure = ("oom", f"out of memory building the batch (cache fill): {_first_line(error)}")
    except Exception as error:  # noqa: BLE001 - the other batch sizes still run
        failure = ("error", f"building the batch failed: {type(error).__name__}: {_first_line(error)}")
        traceback.print_exc()
    if failure is not None:
        state = None
        release_memory(device)
        return [{**_skipped(name, batch, failure[1]), "status": failure[0]} for name in settings.configs], {}, None
    rows, report = [], None
    for name in settings.configs:
        reason = budget.refuse(name)
        if reason is not None:
            row, fusion = _skipped(name, batch, reason), None
        else:
            row, fusion = run_configuration(name, state, settings, accounting, ceilings)
            budget.ran(row)
        rows.append(row)
        report = fusion if fusion is not None else report
        log(_progress(row))
    state = None
    release_memory(device)
    return rows, accounting, report


class Budget:
    """Keeps the run near `seconds` of wall time. Only the configurations that compile (torch.compile;
    difuse's recording, kernel generation and profiling) can take long: one is skipped, and
    recorded as such, when its previous run at another batch size would not fit in what is left.
    The others take seconds and always run."""

    COSTLY = ("compile", "fused_graph")

    def __init__(self, seconds: float):
        self.seconds, self.begin = seconds, time.perf_counter()
        self.last_s: dict[str, float] = {}

    def refuse(self, name: str) -> str | None:
        if name not in self.COSTLY:
            return None
        left = self.seconds - (time.perf_counter() - self.begin)
        expected = self.last_s.get(name, 0.0)
        if expected >= left:
            return (f"time budget: {max(left, 0):.0f} s of --budget-s {self.seconds:.0f} left, "
                    f"its last run took {expected:.0f} s")
        return None

    def ran(self, row: dict) -> None:
        if "wall_s" in row:  # it ran (not skipped)
            self.last_s[row["config"]] = row["wall_s"]


def _skipped(name: str, batch: int, reason: str) -> dict:
    return {"config": name, "label": LABELS[name], "batch": batch, "status": "skipped", "error": reason}


def _progress(row: dict) -> str:
    if row["status"] != "ok":
        return f"B={row['batch']:<3} {row['config']:<12} {row['status']}: {row['error']}"
    extra = f", compile {row['compile_s']:.1f} s" if row.get("compile_s") else ""
    return (f"B={row['batch']:<3} {row['config']:<12} {row['median_ms']:9.3f} ms/step "
            f"({row['x_weight_floor']:.2f}x weight floor, SM MHz {clock(row)}), graph: {row['graph']}{extra}")


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    import triton

    import difuse.runtime

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "difuse_runtime": str(Path(difuse.runtime.__file__).parent)}
    if device.type == "cuda":
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SPECS), default="llada-8b")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,4,16,64; quick 1,2)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (CPU smoke run)")
    parser.add_argument("--configs", default=",".join(RUN_ORDER),
                        help=f"which configurations, run in this order (default: {','.join(RUN_ORDER)})")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall-time budget of the whole run: configurations that would exceed it are skipped")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; quick 16)")
    parser.add_argument("--gen", type=int, default=None, help="generated tokens (default 256; quick 16)")
    parser.add_argument("--block", type=int, default=None, help="block length (default 32; quick 8)")
    parser.add_argument("--tokens-per-step", type=float, default=3.0,
                        help="committed tokens per step assumed for tokens/s (threshold decoder at 0.9: ~3)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per configuration (default 50; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    small = args.quick or args.device.type != "cuda"
    if args.device.type != "cuda" and not (args.quick or args.model == "tiny"):
        parser.error(f"--model {args.model} at real shapes needs CUDA; use --quick (or --model tiny) on a CPU")
    defaults = {"batch": "1,2" if small else "1,4,16,64", "prompt": 16 if small else 512, "gen": 16 if small else 256,
                "block": 8 if small else 32, "iters": 3 if small else 50, "warmup": 1 if small else 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        batches = sorted({int(b) for b in args.batch.split(",")})
    except ValueError:
        parser.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    # the largest batch first, while memory is cleanest; then the smallest (the weight-bound
    # headline) and upwards, so a time budget running short costs the middle sizes' compiles
    args.batches = batches[-1:] + batches[:-1]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    if min(args.batches) < 1 or args.gen % args.block or min(args.prompt, args.iters) < 1:
        parser.error("need batch >= 1, prompt >= 1, iters >= 1 and gen a multiple of block")
    args.spec = TINY_OF[args.model] if (args.quick or args.model == "tiny") else SPECS[args.model]
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def main(argv=None) -> int:
    settings = parse_args(argv)
    threads = torch.get_num_threads()
    if settings.device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and lose to contention on a busy host
    try:
        return run(settings)
    finally:
        torch.set_num_threads(threads)


def run(settings) -> int:
    device, spec = settings.device, settings.spec
    torch.manual_seed(0)
    env = environment(device)
    log(f"{spec.name} on {env['device']}: batches {settings.batches}, configurations {settings.configs}")
    for name in settings.configs:
        reason = skip_reason(name, device)
        if reason:
            log(f"skipping {name} ({LABELS[name]}): {reason}")
    rows, accountings, reports = [], {}, {}
    budget = Budget(settings.budget_s)
    stem = f"step-{spec.name.replace('(tiny)', '-tiny')}-{device_slug(device)}"
    with torch.inference_mode():
        ceilings = measure_ceilings(device, settings.dtype, quick=settings.quick or device.type != "cuda")
        log(f"ceilings: copy {ceilings['copy_bandwidth_Bps'] / 1e12:.3f} TB/s (read + write), "
            f"{ceilings['matmul_size']}^3 {ceilings['matmul_dtype']} matmul "
            f"{ceilings['matmul_flops'] / 1e12:.1f} TFLOP/s (SM MHz {clock(ceilings, 'matmul_')}), sustained for "
            f"{ceilings['matmul_sustain_s']:g} s {ceilings['matmul_flops_sustained'] / 1e12:.1f} TFLOP/s "
            f"(SM MHz {clock(ceilings, 'matmul_sustained_')})")
        begin = time.perf_counter()
        model = build_random_model(spec, device, settings.dtype)
        synchronize(device)
        build_s = time.perf_counter() - begin
        log(f"built {spec.name} with random weights in {build_s:.1f} s: "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters")
        meta = {"model": spec.name, "shapes": repr(spec.config), "block_causal": spec.block_causal,
                "prompt": settings.prompt, "gen": settings.gen, "block": settings.block,
                "cache": "dual (filled once by a refresh forward)", "decoder": "threshold 0.9",
                "dtype": str(settings.dtype).removeprefix("torch."), "tokens_per_step": settings.tokens_per_step,
                "iters": settings.iters, "warmup": settings.warmup, "budget_s": settings.budget_s,
                "batch_order": settings.batches, "run_order": settings.configs, "environment": env,
                "ceilings": ceilings, "model_build_s": build_s, "accounting": accountings,
                "configurations": {c: LABELS[c] for c in CONFIGS}}
        for batch in settings.batches:
            try:
                batch_rows, accounting, report = run_batch(model, spec, batch, settings, ceilings, budget)
            except Exception as error:  # noqa: BLE001 - e.g. a device left unusable by an earlier failure
                traceback.print_exc()
                reason = f"batch failed: {type(error).__name__}: {_first_line(error)}"
                batch_rows, accounting, report = [{**_skipped(n, batch, reason), "status": "error"}
                                                  for n in settings.configs], {}, None
            for row in batch_rows:
                row.update(model=spec.name, device=env["device"], tokens_per_step=settings.tokens_per_step)
                if accounting:
                    row.update({k: accounting[k] for k in ("weight_bytes", "kv_bytes", "flops",
                                                           "routed_experts_per_layer", "cublas_gemm_ms")},
                               weight_floor_ms=accounting["weight_bytes"] / ceilings["copy_bandwidth_Bps"] * 1e3,
                               memory_floor_ms=(accounting["weight_bytes"] + accounting["kv_bytes"])
                               / ceilings["copy_bandwidth_Bps"] * 1e3)
            rows += batch_rows
            accountings[batch] = accounting
            if report is not None:
                reports[batch] = report
            # after every batch size: a run stopped from outside still leaves what it measured
            paths = write_outputs(settings.out, stem, meta, rows, reports)
    for batch, report in sorted(reports.items()):
        print(f"\nfusion report of fused_graph at batch {batch}, by group kind (full table in the -fusion files):")
        print(fusion_table(fusion_summary(report.to_dict())))
    print_summary(meta, rows, accountings, ceilings, paths)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
