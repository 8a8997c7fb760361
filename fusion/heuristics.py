"""FusionHeuristics: should a group run fused? Static rules first, then (optionally) measurement.

Every decision carries a reason string, which the FusionReport shows. Profile decisions are
persisted as JSON beside the kernel (`<cache_dir>/kernels/<key>.json`), per timing mode, and reused
by later runs.

Timing modes. "graph" (CUDA): the runtime replays a step in a CUDA graph, where a launch costs
~1-2 us of GPU time instead of 5-100 us of Python, so candidates are timed the same way: many calls
captured in one graph, replayed, GPU time per call from CUDA events. Inputs rotate through enough
copies to exceed the L2 cache, so neither candidate is timed on L2-resident data it would not have.
"eager": one call launched from Python at a time (do_bench on CUDA, perf_counter elsewhere).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import torch

from .cache import KernelCache
from .config import FusionConfig
from .cuda_graphs import capture_graph
from .ir import SubGraph
from .launch import serial_launches

log = logging.getLogger("difuse.fusion")


@dataclass
class Decision:
    fuse: bool
    reason: str
    t_fused: float | None = None  # seconds, median
    t_fallback: float | None = None
    source: str = "static"  # "static", "profiled", "memory", "disk"
    mode: str | None = None  # timing mode of t_fused / t_fallback: "graph" or "eager"


def timing_mode(requested: str, device: str) -> str:
    """The mode actually used: CUDA graphs exist only on CUDA devices."""
    return "graph" if requested == "graph" and torch.device(device).type == "cuda" else "eager"


def time_callable(fn: Callable[[], object], device: str) -> float:
    """Median seconds per call: triton.testing.do_bench on CUDA, perf_counter otherwise."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") * 1e-3
    fn()  # warm-up (compilation, caches)
    samples = []
    budget = time.perf_counter() + 0.2
    while len(samples) < 3 or (len(samples) < 25 and time.perf_counter() < budget):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def rotation_copies(footprint_bytes: int, device: str, max_copies: int = 256) -> int:
    """How many input sets to rotate through so that together they exceed twice the L2 cache."""
    props = torch.cuda.get_device_properties(torch.device(device))
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(max_copies, math.ceil(2 * l2 / max(footprint_bytes, 1))))


def time_in_cuda_graph(calls: list[Callable[[], object]], min_calls: int = 32, replays: int = 20) -> float:
    """Median GPU seconds per call of `calls` (cycled to at least `min_calls` launches) captured in
    one CUDA graph: the per-replay launch is shared by all captured calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: JIT compiles, allocator pools
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    n = len(calls) * math.ceil(min_calls / len(calls))

    def launch_all():
        for k in range(n):
            calls[k % len(calls)]()

    graph = capture_graph(launch_all)
    graph.replay()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / n)
    del graph
    return statistics.median(samples)


def _footprint(inputs: list) -> int:
    storages = {}
    for t in inputs:
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def traffic(graph: SubGraph, node_indices: list[int]) -> tuple[int, int, int]:
    """Memory traffic of a group, from its tensor sizes: (bytes moved unfused, bytes moved fused,
    bytes of the fused outputs). Unfused, every op reads its inputs and writes its outputs."""
    chosen = set(node_indices)
    unfused = 0
    for i in node_indices:
        node = graph.nodes[i]
        unfused += sum(graph.meta[n].nbytes for n in set(node.inputs))
        unfused += sum(graph.meta[n].nbytes for n in node.outputs)
    sub = graph.subgraph(sorted(chosen))
    fused_out = sum(graph.meta[n].nbytes for n in sub.outputs)
    fused = sum(graph.meta[n].nbytes for n in sub.inputs) + fused_out
    return unfused, fused, fused_out


class FusionHeuristics:
    def __init__(self, config: FusionConfig | None = None, cache: KernelCache | None = None):
        self.config = config or FusionConfig()
        self.cache = cache or KernelCache(self.config.cache_dir)
        self._decisions: dict[str, Decision] = {}

    def static_rules(self, graph: SubGraph, node_indices: list[int], generic: bool = True) -> Decision:
        """Whitelist, node count, tensor size, bytes saved and peak-memory growth."""
        cfg = self.config
        if not cfg.enable_fusion:
            return Decision(False, "fusion disabled")
        nodes = [graph.nodes[i] for i in node_indices]
        if generic:
            banned = sorted({n.op for n in nodes if n.op not in cfg.op_whitelist})
            if banned:
                return Decision(False, f"ops not in the whitelist: {', '.join(banned)}")
            if len(nodes) < cfg.min_nodes:
                return Decision(False, f"{len(nodes)} node(s) < min_nodes={cfg.min_nodes}")
            if len(nodes) > cfg.max_nodes:
                return Decision(False, f"{len(nodes)} nodes > max_nodes={cfg.max_nodes}")
        largest = max((graph.meta[n].numel for node in nodes for n in (*node.inputs, *node.outputs)), default=0)
        if largest < cfg.min_tensor_elements:
            return Decision(False, f"largest tensor has {largest} elements < min_tensor_elements="
                                   f"{cfg.min_tensor_elements}")
        unfused, fused, fused_out = traffic(graph, node_indices)
        saved = unfused - fused
        if generic and saved <= 0:
            return Decision(False, f"saves no memory traffic ({unfused} B unfused vs {fused} B fused)")
        # Fused outputs are all alive at once; unfused, the largest single op output bounds the peak.
        unfused_peak = max((graph.meta[n].nbytes for node in nodes for n in node.outputs), default=0)
        growth = fused_out - unfused_peak
        if growth > 0 and growth > cfg.max_memory_growth * max(saved, 1):
            return Decision(False, f"peak memory grows by {growth} B > {cfg.max_memory_growth:g} x {saved} B saved")
        return Decision(True, f"saves {saved} B of traffic ({unfused} -> {fused} B)")

    def profile_and_decide(self, key: str, fused: Callable[[list], object], fallback: Callable[[list], object],
                           make_inputs: Callable[[bool], list], device: str = "cpu",
                           min_ratio: float = 0.0) -> Decision:
        """Keep the fused kernel only if t_fused < ratio * t_fallback, ratio = max(fusion_ratio,
        min_ratio); measured once per key (group hash, shape bucket, dtype, device), timing mode and
        ratio, remembered in memory and on disk.

        fused / fallback take an input list; make_inputs(distinct) returns one: distinct=True
        clones every tensor (a separate copy for L2 rotation), False only those written in place."""
        mode = timing_mode(self.config.profile_mode, device)
        ratio = max(self.config.fusion_ratio, min_ratio)
        key = f"{key}-{mode}-{ratio:g}"
        if key in self._decisions:
            d = self._decisions[key]
            return Decision(d.fuse, d.reason, d.t_fused, d.t_fallback, "memory", d.mode)
        stored = self.cache.read_meta(key).get("decision")
        if stored:
            d = Decision(**{**stored, "source": "disk"})
            self._decisions[key] = d
            return d
        if mode == "graph":
            first = make_inputs(False)
            copies = rotation_copies(_footprint(first), device)
            # inputs larger than twice the L2 cache evict themselves: one set, no clone
            sets = [first] if copies == 1 else [make_inputs(True) for _ in range(copies)]
            try:
                with serial_launches():
                    t_fused = time_in_cuda_graph([partial(fused, s) for s in sets])
            except Exception as e:  # the runtime replays steps in CUDA graphs: such a kernel cannot run there
                return Decision(False, f"fused kernel cannot be captured in a CUDA graph: {e}", source="profiled",
                                mode=mode)
            try:
                t_fallback = time_in_cuda_graph([partial(fallback, s) for s in sets])
            except Exception as e:  # the step cannot be graphed anyway: compare what it will pay, eager launches
                log.warning("unfused ops of %s cannot be captured in a CUDA graph (%s): timing eagerly", key, e)
                mode = "eager"
            del sets, first
        if mode == "eager":
            with serial_launches():
                t_fused = time_callable(lambda: fused(make_inputs(False)), device)
            t_fallback = time_callable(lambda: fallback(make_inputs(False)), device)
        fuse = t_fused < ratio * t_fallback
        verdict = "<" if fuse else ">="
        d = Decision(fuse, f"measured ({mode}) {t_fused * 1e6:.1f} us fused {verdict} {ratio:g} x "
                           f"{t_fallback * 1e6:.1f} us unfused", t_fused, t_fallback, "profiled", mode)
        self._decisions[key] = d
        meta = self.cache.read_meta(key)
        meta["decision"] = asdict(d)
        self.cache.write_meta(key, meta)
        return d
