"""FusionHeuristics: should a group run fused? Static rules first, then (optionally) measurement.

Every decision carries a reason string, which the FusionReport shows. Profile decisions are
persisted as JSON beside the kernel (`<cache_dir>/kernels/<key>.json`) and reused by later runs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .cache import KernelCache
from .config import FusionConfig
from .ir import SubGraph


@dataclass
class Decision:
    fuse: bool
    reason: str
    t_fused: float | None = None  # seconds, median
    t_fallback: float | None = None
    source: str = "static"  # "static", "profiled", "memory", "disk"


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


def _traffic(graph: SubGraph, node_indices: list[int]) -> tuple[int, int, int]:
    """(bytes moved unfused, bytes moved fused, bytes of the fused outputs)."""
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
        unfused, fused, fused_out = _traffic(graph, node_indices)
        saved = unfused - fused
        if generic and saved <= 0:
            return Decision(False, f"saves no memory traffic ({unfused} B unfused vs {fused} B fused)")
        # Fused outputs are all alive at once; unfused, the largest single op output bounds the peak.
        unfused_peak = max((graph.meta[n].nbytes for node in nodes for n in node.outputs), default=0)
        growth = fused_out - unfused_peak
        if growth > 0 and growth > cfg.max_memory_growth * max(saved, 1):
            return Decision(False, f"peak memory grows by {growth} B > {cfg.max_memory_growth:g} x {saved} B saved")
        return Decision(True, f"saves {saved} B of traffic ({unfused} -> {fused} B)")

    def profile_and_decide(self, key: str, fused_fn: Callable[[], object], fallback_fn: Callable[[], object],
                           device: str = "cpu") -> Decision:
        """Keep the fused kernel only if t_fused < fusion_ratio * t_fallback; measured once per key
        (group hash, shape bucket, dtype, device), remembered in memory and on disk."""
        if key in self._decisions:
            d = self._decisions[key]
            return Decision(d.fuse, d.reason, d.t_fused, d.t_fallback, "memory")
        stored = self.cache.read_meta(key).get("decision")
        if stored:
            d = Decision(**{**stored, "source": "disk"})
            self._decisions[key] = d
            return d
        t_fused = time_callable(fused_fn, device)
        t_fallback = time_callable(fallback_fn, device)
        ratio = self.config.fusion_ratio
        fuse = t_fused < ratio * t_fallback
        verdict = "<" if fuse else ">="
        d = Decision(fuse, f"measured {t_fused * 1e6:.1f} us fused {verdict} {ratio:g} x "
                           f"{t_fallback * 1e6:.1f} us unfused", t_fused, t_fallback, "profiled")
        self._decisions[key] = d
        meta = self.cache.read_meta(key)
        meta["decision"] = asdict(d)
        self.cache.write_meta(key, meta)
        return d
