"""The executable side of a schedule: the groups a FusionScheduler chose, and the Program it
generates from them -- straight-line Python, one line per unfused op or fused launch, `del` after
last use, no interpreter loop. A Program allocates only its outputs and issues no host syncs, so
it can be captured in a CUDA graph.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_unflatten

from .compiler import CompiledGroup
from .heuristics import Decision
from .ir import Ref, ScalarArg, SubGraph, _resolve
from .pattern import Pattern
from .report import FusionReport, GroupRecord


@dataclass
class Group:
    """Ops of a SubGraph scheduled together: a pattern match or a generic group, and its decision."""

    kind: str  # "pattern" or "generic"
    name: str
    nodes: tuple[int, ...]
    inputs: list[str]
    outputs: list[str]
    scalar_args: list[int] = field(default_factory=list)  # generic: kernel scalar order
    params: dict = field(default_factory=dict)  # pattern: keyword params (may hold ScalarArg)
    pattern: Pattern | None = None
    compiled: CompiledGroup | None = None
    decision: Decision | None = None
    record: GroupRecord | None = None

    @property
    def fused(self) -> bool:
        return self.decision is not None and self.decision.fuse


class Program:
    """An executable schedule of a SubGraph. Call it with the recorded function's positional args."""

    def __init__(self, graph: SubGraph, groups: list[Group], source: str, fn: Callable, report: FusionReport):
        self.graph = graph
        self.groups = groups
        self.source = source
        self.fn = fn
        self.report = report

    def __call__(self, *args):
        with torch.no_grad():
            return self.fn(*args)

    @property
    def fused_groups(self) -> list[Group]:
        return [g for g in self.groups if g.fused]


class _Source:
    """Renders node arguments as Python source; non-trivial literals become named globals."""

    def __init__(self):
        self.globals: dict[str, Any] = {}
        self._ids: dict[int, str] = {}

    def const(self, value: Any, prefix: str = "k") -> str:
        key = id(value)
        if key not in self._ids:
            name = f"_{prefix}{len(self.globals)}"
            self.globals[name] = value
            self._ids[key] = name
        return self._ids[key]

    def expr(self, x: Any) -> str:
        if isinstance(x, Ref):
            return x.name
        if isinstance(x, ScalarArg):
            return f"arg{x.index}"
        if x is None or isinstance(x, (bool, int, str)):
            return repr(x)
        if isinstance(x, float):
            return repr(x) if math.isfinite(x) else f"float({str(x)!r})"
        if isinstance(x, list):
            return "[" + ", ".join(self.expr(v) for v in x) + "]"
        if isinstance(x, tuple):
            return "(" + "".join(self.expr(v) + ", " for v in x) + ")"
        return self.const(x)


def build_program(graph: SubGraph, groups: list[Group], deps: list[set[int]], report: FusionReport) -> Program:
    """The Program of `graph` with the fused `groups`: straight-line Python in dependency order."""
    fused = [g for g in groups if g.fused]
    owner: dict[int, int] = {}
    for k, g in enumerate(fused):
        for i in g.nodes:
            owner[i] = k
    step_of = [("g", owner[i]) if i in owner else ("n", i) for i in range(len(graph.nodes))]
    step_deps: dict[tuple, set[tuple]] = {}
    first: dict[tuple, int] = {}
    for i, s in enumerate(step_of):
        first.setdefault(s, i)
        step_deps.setdefault(s, set()).update(step_of[p] for p in deps[i] if step_of[p] != s)
    indeg = {s: len(d) for s, d in step_deps.items()}
    users: dict[tuple, list[tuple]] = {s: [] for s in step_deps}
    for s, d in step_deps.items():
        for p in d:
            users[p].append(s)
    ready = [(first[s], s) for s, n in indeg.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, s = heapq.heappop(ready)
        order.append(s)
        for u in users[s]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (first[u], u))
    if len(order) != len(step_deps):
        raise RuntimeError("fusion created a cycle in the schedule")

    src = _Source()
    src.globals.update(graph.constants)
    hoisted = _hoist_constant_views(graph, src, order)
    lines: list[tuple[str, list[str], list[str]]] = []  # (code, reads, writes)
    for kind, k in order:
        if kind == "n":
            if k in hoisted:
                continue
            node = graph.nodes[k]
            fn = src.const(getattr(node.target, "_op", node.target), "op")  # skips a Python frame
            args = [*(src.expr(a) for a in node.args), *(f"{n}={src.expr(v)}" for n, v in node.kwargs.items())]
            call = f"{fn}({', '.join(args)})"
            outs = [n or "_" for n in node.out_leaves]
            lhs = outs[0] if len(outs) == 1 else (", ".join(outs) + ("," if len(outs) == 1 else ""))
            lines.append((f"{lhs} = {call}" if outs else call, list(node.inputs), list(node.outputs)))
        else:
            g = fused[k]
            reads = list(g.inputs)
            if g.kind == "generic":
                fn = src.const(g.compiled.fn, "fused")
                call = f"{fn}({', '.join([*g.inputs, *(f'arg{i}' for i in g.scalar_args)])})"
            else:
                fn = src.const(_returning_tuple(g.pattern.kernel), "pattern")
                kw = [f"{n}={src.expr(v)}" for n, v in g.params.items()]
                call = f"{fn}({', '.join([*g.inputs, *kw])})"
            lines.append((f"{', '.join(g.outputs)}, = {call}", reads, list(g.outputs)))
    keep = set(graph.inputs) | set(src.globals) | set(graph.outputs)
    last_use: dict[str, int] = {}
    for j, (_, reads, writes) in enumerate(lines):
        for n in (*reads, *writes):
            last_use[n] = j
    body = []
    for j, (code, _, _) in enumerate(lines):
        body.append(code)
        dead = sorted(n for n, lj in last_use.items() if lj == j and n not in keep)
        if dead:
            body.append(f"del {', '.join(dead)}")
    leaves = [src.expr(x) for x in graph.output_leaves]
    if graph.output_spec.is_leaf():
        ret = leaves[0]
    else:
        src.globals["_unflatten"], src.globals["_spec"] = tree_unflatten, graph.output_spec
        ret = f"_unflatten([{', '.join(leaves)}], _spec)"
    params = ", ".join(f"arg{i}" for i in range(graph.num_args))
    text = "\n".join([f"def program({params}):", *("    " + b for b in body), f"    return {ret}"]) + "\n"
    env = dict(src.globals)
    exec(compile(text, f"<difuse program {graph.structural_hash()[:12]}>", "exec"), env)
    return Program(graph, groups, text, env["program"], report)


def _hoist_constant_views(graph: SubGraph, src: _Source, order) -> set[int]:
    """Views of constants (weight.t(), cache slices) are computed once at build time: a view
    aliases its base, so later in-place writes stay visible through it (rebinding a
    parameter's storage with `.data = ...` after compiling is not)."""
    hoisted: set[int] = set()
    constant_values = set(graph.constants)
    for kind, k in order:
        if kind != "n":
            continue
        node = graph.nodes[k]
        returns = node.target._schema.returns
        is_view = (len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write
                   and not node.mutates)
        if is_view and node.inputs and all(n in constant_values for n in node.inputs) and not node.scalar_args():
            env = {n: src.globals[n] for n in node.inputs}
            value = node.target(*_resolve(node.args, env, ()), **_resolve(node.kwargs, env, ()))
            src.globals[node.outputs[0]] = value
            constant_values.add(node.outputs[0])
            hoisted.add(k)
    return hoisted


def _returning_tuple(fn: Callable) -> Callable:
    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)

    return call
