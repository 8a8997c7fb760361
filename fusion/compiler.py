"""KernelCompiler: a group of recorded ops -> one fused launch function, cached.

The launch function takes the group's input tensors (kernel order) then its runtime scalars and
returns the group's outputs as a tuple. Its source is straight-line Python with every size and
stride baked in, so a call is output allocation plus one kernel launch: no host syncs, no CPU
tensors, scalars passed as kernel arguments (CUDA-graph capturable).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import codegen_triton
from .cache import KernelCache, cache_key, device_name, library_versions
from .config import FusionConfig
from .ir import SubGraph
from .launch import ieee_quiet
from .lowering import RowKernel, lower

log = logging.getLogger("difuse.fusion")


class CompileError(RuntimeError):
    pass


@dataclass
class CompiledGroup:
    fn: Callable
    key: str
    inputs: list[str]  # graph value names, argument order
    scalar_args: list[int]  # positional indices of the recorded function's scalars, argument order
    outputs: list[str]
    structural_hash: str
    source_path: str
    compile_seconds: float
    cache_hit: str | None  # "memory", "disk" or None
    bytes_moved: int
    meta: dict = field(default_factory=dict)


def _shape_bucket(kernel: RowKernel, looped: bool, block: int) -> list:
    return [len(kernel.lead), "loop" if looped else "single", block,
            [inp.context for inp in kernel.inputs], [o.domain for o in kernel.outputs]]


def _bytes_moved(graph: SubGraph, kernel: RowKernel) -> int:
    read = sum(graph.meta[v].nbytes for v in kernel.input_values)
    written = sum(graph.meta[o.value].nbytes for o in kernel.outputs)
    return read + written


class KernelCompiler:
    def __init__(self, config: FusionConfig | None = None):
        self.config = config or FusionConfig()
        self.cache = KernelCache(self.config.cache_dir)
        self._versions = library_versions()
        self._launchers: dict[str, CompiledGroup] = {}

    def compile_group(self, graph: SubGraph, node_indices: list[int]) -> CompiledGroup:
        """Lower, generate, cache and wrap one generic group. Raises CompileError."""
        start = time.perf_counter()
        try:
            kernel = lower(graph, node_indices)
        except ValueError as e:
            raise CompileError(str(e)) from e
        sub = graph.subgraph(node_indices)
        looped, block, warps = codegen_triton.block_plan(kernel.n_cols, self.config.max_single_block)
        dtypes = [str(graph.meta[v].dtype) for v in kernel.input_values] + [str(o.dtype) for o in kernel.outputs]
        device = graph.meta[kernel.input_values[0]].device if kernel.input_values else "cpu"
        key = cache_key(self.config.backend, sub.structural_hash(), dtypes,
                        _shape_bucket(kernel, looped, block), device_name(device), self._versions)
        launch_key = cache_key(key, kernel.lead, kernel.n_cols, codegen_triton.launch_arguments(kernel))
        if launch_key in self._launchers:
            self.cache.stats["memory_hits"] += 1
            hit = self._launchers[launch_key]
            # same structure, so the same argument order; the value names are this group's own
            return CompiledGroup(**{**hit.__dict__, "cache_hit": "memory", "compile_seconds": 0.0,
                                    "inputs": list(kernel.input_values), "scalar_args": list(kernel.scalar_args),
                                    "outputs": [o.value for o in kernel.outputs]})
        if key in self.cache.memory:
            module, hit = self.cache.memory[key], "memory"
            self.cache.stats["memory_hits"] += 1
        else:
            source = self.cache.load_source(key)
            hit = "disk" if source is not None else None
            if source is None:
                source = self._generate(kernel, looped, block)
                self.cache.store_source(key, source)
                self.cache.stats["misses"] += 1
            else:
                self.cache.stats["disk_hits"] += 1
            try:
                module = self.cache.import_module(key)
            except Exception as e:
                raise CompileError(f"generated kernel {self.cache.source_path(key)} does not import: {e}") from e
            self.cache.memory[key] = module
        try:
            fn = self._launcher(kernel, module, block, warps, device, graph)
        except Exception as e:
            raise CompileError(f"building the launcher of {self.cache.source_path(key)} failed: {e}") from e
        if torch.device(device).type == "cpu":
            fn = ieee_quiet(device)(fn)  # the recorded ops may divide by zero or overflow, as torch allows
        group = CompiledGroup(fn, key, list(kernel.input_values), list(kernel.scalar_args),
                              [o.value for o in kernel.outputs], sub.structural_hash(),
                              str(self.cache.source_path(key)), time.perf_counter() - start, hit,
                              _bytes_moved(graph, kernel))
        self._launchers[launch_key] = group
        return group

    def _generate(self, kernel: RowKernel, looped: bool, block: int) -> str:
        if self.config.backend == "ninetoothed":
            from . import codegen_ninetoothed

            return codegen_ninetoothed.generate(kernel, block)
        return codegen_triton.generate(kernel, "fused_kernel", looped)

    def _launcher(self, kernel: RowKernel, module, block: int, warps: int, device: str, graph: SubGraph):
        if self.config.backend == "ninetoothed":
            from . import codegen_ninetoothed

            return codegen_ninetoothed.launcher(kernel, module, block, device)
        ins = [f"x{j}" for j in range(len(kernel.input_values))]
        scalars = [f"s{j}" for j in range(len(kernel.scalar_args))]
        lines = [f"def launch({', '.join(ins + scalars)}):"]
        outs = []
        for j, o in enumerate(kernel.outputs):
            lines.append(f"    o{j} = torch.empty_strided({tuple(o.shape)}, {tuple(o.stride)}, "
                         f"dtype={o.dtype}, device=device)")
            outs.append(f"o{j}")
        sizes = ", ".join(str(a) for a in codegen_triton.launch_arguments(kernel))
        lines.append(f"    kernel[({kernel.rows},)]({', '.join(ins + outs + scalars)}, {sizes}, "
                     f"BLOCK={block}, num_warps={warps})")
        lines.append(f"    return ({', '.join(outs)},)")
        env = {"torch": torch, "kernel": module.fused_kernel, "device": torch.device(device)}
        exec(compile("\n".join(lines), f"<difuse launcher {kernel.rows}x{kernel.n_cols}>", "exec"), env)
        return env["launch"]
