"""FusionScheduler: SubGraph -> Program (patterns, then generic groups, then heuristics).

1. Patterns, highest priority first; a match is kept if it overlaps no earlier match, its outputs
   cover every value escaping its nodes, and contracting it creates no cycle.
2. Generic groups: connected components of fusible edges (supported pointwise / row-reduction ops,
   one reduction, one row space, no in-place ops, at most max_nodes), grown without cycles.
3. Heuristics: static rules, then on first use validation (debug_mode) and measurement (profile).
   The ops of a pattern group turned down there go back to the other patterns and generic fusion.
The Program (fusion/program.py) is generated straight-line Python that a CUDA graph can capture.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cache import cache_key, device_name
from .compiler import CompileError, KernelCompiler
from .config import FusionConfig
from .heuristics import Decision, FusionHeuristics, traffic
from .ir import Ref, ScalarArg, SubGraph, _resolve
from .lowering import REDUCTIONS, SUPPORTED_OPS, Unsupported, lower, row_space
from .pattern import Match, Pattern, registered_patterns
from .program import Group, Program, build_program
from .report import FusionReport, GroupRecord

log = logging.getLogger("difuse.fusion")


def _alike(graph: SubGraph, g: Group) -> tuple:
    """What a group's kernel, reference and timing depend on: the same key, the same decision."""
    inputs = tuple((graph.meta[n].shape, graph.meta[n].dtype, graph.meta[n].stride) for n in g.inputs)
    return (g.kind, g.name, g.compiled.key if g.compiled else None, inputs, repr(sorted(g.params.items())))


def _share_decision(first: Group, g: Group) -> None:
    """g takes the decision (and the measured figures) of `first`, a group alike it."""
    g.decision = first.decision
    for name in ("decision", "reason", "decided_by", "bytes_moved", "t_fused", "t_fallback", "timing"):
        setattr(g.record, name, getattr(first.record, name))


def dependencies(graph: SubGraph) -> list[set[int]]:
    """deps[i]: nodes that must run before node i -- data edges plus the order of reads and
    in-place writes of every storage (aliases included)."""
    deps: list[set[int]] = []
    last_writer: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        d = {p for n in node.inputs if (p := graph.producer(n)) is not None}
        for n in set(node.inputs):
            s = graph.meta[n].storage
            if s in last_writer:
                d.add(last_writer[s])
            readers.setdefault(s, []).append(i)
        for n in node.mutates:
            s = graph.meta[n].storage
            d.update(r for r in readers.get(s, []) if r != i)
            last_writer[s], readers[s] = i, []
        deps.append(d)
    return deps


def _creates_cycle(members: set[int], deps: list[set[int]], users: list[set[int]]) -> bool:
    """Whether some path leaves `members` and comes back (contracting them would create a cycle)."""
    hi = max(members)
    stack = [u for m in members for u in users[m] if u not in members and u < hi]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for u in users[v]:
            if u in members:
                return True
            if u < hi:
                stack.append(u)
    return False


class FusionScheduler:
    def __init__(self, config: FusionConfig | None = None, patterns: list[Pattern] | None = None):
        self.config = config or FusionConfig()
        self.patterns = registered_patterns() if patterns is None else sorted(patterns, key=lambda p: -p.priority)
        self.compiler = KernelCompiler(self.config)
        self.heuristics = FusionHeuristics(self.config, self.compiler.cache)
        self._programs: dict[tuple, Program] = {}
        self._variants: dict[tuple, SubGraph] = {}
        self._report = FusionReport()
        self._first_output = None  # the output of the reference replay done while compiling

    # -- grouping ------------------------------------------------------------------------------
    def _match_patterns(self, graph: SubGraph, deps, users, taken: set[int] = frozenset(),
                        within: set[int] | None = None, excluded: frozenset = frozenset()) -> list[Group]:
        """Pattern groups, highest priority first, over the nodes not `taken` (and only inside
        `within`, when given), leaving out the (pattern name, nodes) pairs in `excluded`."""
        taken = set(taken)
        groups = []
        if not self.config.enable_fusion:
            return groups
        for pattern in self.patterns:
            try:
                matches = pattern.match(graph)
            except Exception as e:  # a broken matcher must not take the model down
                if not self.config.fallback_on_error:
                    raise
                log.warning("pattern %s: matcher failed: %s", pattern.name, e)
                continue
            for m in matches:
                nodes = tuple(sorted(m.nodes))
                if (pattern.name, nodes) in excluded or (within is not None and not within.issuperset(nodes)):
                    continue
                reason = self._invalid_match(graph, m, taken, deps, users)
                if reason:
                    log.debug("pattern %s: match at %s rejected: %s", pattern.name, m.nodes, reason)
                    continue
                taken.update(m.nodes)
                scalars = [v.index for v in m.params.values() if isinstance(v, ScalarArg)]
                groups.append(Group("pattern", pattern.name, tuple(sorted(m.nodes)), list(m.inputs),
                                    list(m.outputs), scalars, dict(m.params), pattern))
        return groups

    @staticmethod
    def _invalid_match(graph: SubGraph, m: Match, taken: set[int], deps, users) -> str | None:
        members = set(m.nodes)
        if not members or members & taken:
            return "overlaps an earlier match"
        if any(not 0 <= i < len(graph.nodes) for i in members):
            return "node index out of range"
        produced = {n for i in members for n in graph.nodes[i].outputs}
        escaping = {n for n in produced if n in graph.outputs or any(u not in members for u in graph.users(n))}
        missing = escaping - set(m.outputs)
        if missing:
            return f"escaping values not in outputs: {sorted(missing)}"
        if any(n not in produced for n in m.outputs):
            return "an output is not produced by the matched nodes"
        if any(graph.meta.get(n) is None for n in m.inputs):
            return "unknown input value"
        if _creates_cycle(members, deps, users):
            return "contracting the match would create a cycle"
        return None

    def _generic_groups(self, graph: SubGraph, taken: set[int], deps, users) -> list[list[int]]:
        cfg = self.config
        fusible = [i for i, n in enumerate(graph.nodes)
                   if i not in taken and not n.mutates and n.op in SUPPORTED_OPS and n.op in cfg.op_whitelist]
        fusible_set = set(fusible)
        group_of: dict[int, int] = {i: i for i in fusible}
        members: dict[int, set[int]] = {i: {i} for i in fusible}
        space: dict[int, tuple] = {}
        for i in fusible:
            try:
                space[i] = row_space(graph, [i])
            except Unsupported:
                space[i] = None

        def reductions(ms):
            return sum(graph.nodes[j].op in REDUCTIONS for j in ms)

        for i in fusible:
            for name in graph.nodes[i].inputs:
                p = graph.producer(name)
                if p is None or p not in fusible_set:
                    continue
                a, b = group_of[p], group_of[i]
                if a == b:
                    continue
                merged = members[a] | members[b]
                if len(merged) > cfg.max_nodes or reductions(merged) > 1:
                    continue
                try:
                    lower(graph, sorted(merged))
                except Unsupported:
                    continue
                if _creates_cycle(merged, deps, users):
                    continue
                for j in members[b]:
                    group_of[j] = a
                members[a] = merged
                del members[b]
        return [sorted(ms) for ms in members.values() if len(ms) >= 1]

    # -- compile -------------------------------------------------------------------------------
    def compile(self, graph: SubGraph, *args) -> Program:
        """Schedule `graph`; with example `args` (the recorded function's positional args), fused
        kernels are validated / profiled on the real intermediate values of one reference replay
        (which runs the step once, like dispatch does on first use); without, on random inputs."""
        start = time.perf_counter()
        deps = dependencies(graph)
        users: list[set[int]] = [set() for _ in graph.nodes]
        for i, d in enumerate(deps):
            for p in d:
                users[p].add(i)
        groups = self._match_patterns(graph, deps, users)
        groups += self._generic(graph, {i for g in groups for i in g.nodes}, deps, users)
        for g in groups:
            self._decide_static(graph, g)
        statically_fused = [g for g in groups if g.fused]
        # Groups alike in everything a kernel sees (every layer's rope, say) are tried, validated
        # and profiled once, on the first one's values: capturing every layer's inputs would copy
        # each buffer written in place (a whole KV cache) to keep its value before the write.
        firsts: dict[tuple, Group] = {}
        for g in groups:
            if g.fused:
                firsts.setdefault(_alike(graph, g), g)
        values = self._example_values(graph, list(firsts.values()), args)
        for g in groups:
            if not g.fused:
                continue
            first = firsts[_alike(graph, g)]
            if first is g:
                self._decide_dynamic(graph, g, values, args)
            else:
                _share_decision(first, g)
        turned_down = [g for g in statically_fused if g.kind == "pattern" and not g.fused]
        groups += self._regroup(graph, turned_down, groups, firsts, values, args, deps, users)
        program = build_program(graph, groups, deps, self._report)
        self._report.compile_seconds += time.perf_counter() - start
        return program

    def _generic(self, graph: SubGraph, taken: set[int], deps, users) -> list[Group]:
        """Generic groups over the fusible nodes not `taken`."""
        if not self.config.enable_fusion:
            return []
        groups = []
        for nodes in self._generic_groups(graph, taken, deps, users):
            if len(nodes) >= self.config.min_nodes:
                sub = graph.subgraph(nodes)
                groups.append(Group("generic", "generic", tuple(nodes), list(sub.inputs), list(sub.outputs)))
        return groups

    def _regroup(self, graph: SubGraph, turned_down: list[Group], groups: list[Group], firsts: dict,
                 values: dict, args: tuple, deps, users) -> list[Group]:
        """The ops of pattern groups the profile rule (or a failing kernel) turned down, offered to
        the lower-priority patterns and to generic fusion as if those groups had never matched: an
        Add+RMSNorm kernel turned down can leave the RMSNorm kernel, say. The new groups are
        decided on the values the turned-down groups' own ops compute from the inputs captured for
        them (the step is not replayed twice), once per alike class; they are not regrouped again."""
        if not turned_down:
            return []
        freed = {i for g in turned_down for i in g.nodes}
        others = {i for g in groups for i in g.nodes} - freed
        excluded = frozenset((g.name, tuple(sorted(g.nodes))) for g in turned_down)
        new = self._match_patterns(graph, deps, users, taken=others, within=freed, excluded=excluded)
        claimed = {i for g in new for i in g.nodes}
        new += self._generic(graph, set(range(len(graph.nodes))) - (freed - claimed), deps, users)
        if not new:
            return []
        for g in turned_down:
            g.record.reason += "; its ops went back to the other patterns and generic fusion"
        tried = [g for g in turned_down if firsts.get(_alike(graph, g)) is g]
        env = self._replay_groups(graph, tried, values, args)
        for g in new:
            self._decide_static(graph, g)
        new_firsts: dict[tuple, Group] = {}
        for g in new:
            if g.fused and all(n in env for n in g.inputs):
                new_firsts.setdefault(_alike(graph, g), g)
        for g in new:
            if not g.fused:
                continue
            first = new_firsts.get(_alike(graph, g))
            if first is g:
                self._decide_dynamic(graph, g, env, args)
            elif first is not None:
                _share_decision(first, g)
            else:
                g.decision = Decision(False, "not tried: no example values for its inputs")
                g.record.decision, g.record.reason = False, g.decision.reason
        return new

    @staticmethod
    def _replay_groups(graph: SubGraph, groups: list[Group], values: dict, args: tuple) -> dict[str, torch.Tensor]:
        """Every value the ops of `groups` read or compute, run on their captured inputs (which
        hold copies of the storages the graph writes, so the replay writes nothing outside)."""
        if not args:
            args = tuple(graph.specialized.get(i, graph.scalars[i](1) if i in graph.scalars else None)
                         for i in range(graph.num_args))
        env: dict[str, Any] = {}
        with torch.no_grad():
            for g in groups:
                scope = {**graph.constants, **{n: values[n] for n in g.inputs}}
                for i in sorted(g.nodes):
                    node = graph.nodes[i]
                    result = node.target(*_resolve(node.args, scope, args), **_resolve(node.kwargs, scope, args))
                    for name, value in zip(node.out_leaves, tree_flatten(result)[0]):
                        if name is not None:
                            scope[name] = value
                env.update(scope)
        return env

    def _decide_static(self, graph: SubGraph, g: Group) -> None:
        g.decision = self.heuristics.static_rules(graph, list(g.nodes), generic=g.kind == "generic")
        g.record = self._report.add(GroupRecord(name=g.name, kind=g.kind, nodes=len(g.nodes),
                                                ops=[graph.nodes[i].op for i in g.nodes],
                                                decision=g.decision.fuse, reason=g.decision.reason,
                                                shape=_shape_bucket(graph, g.inputs),
                                                traffic=traffic(graph, list(g.nodes))[:2]))
        if not g.fused:
            return
        if g.kind == "generic":
            try:
                g.compiled = self.compiler.compile_group(graph, list(g.nodes))
            except CompileError as e:
                if not self.config.fallback_on_error:
                    raise
                log.warning("generic group of %d nodes falls back: %s", len(g.nodes), e)
                g.decision = Decision(False, f"compile failed, unfused ops run instead: {e}")
                g.record.decision, g.record.reason = False, g.decision.reason
                return
            g.inputs, g.outputs, g.scalar_args = g.compiled.inputs, g.compiled.outputs, g.compiled.scalar_args
            g.record.compile_seconds = g.compiled.compile_seconds
            g.record.cache_hit = g.compiled.cache_hit
            g.record.bytes_moved = g.compiled.bytes_moved
            g.record.hash = g.compiled.structural_hash

    def _example_values(self, graph: SubGraph, groups: list[Group], args: tuple) -> dict[str, torch.Tensor]:
        """Inputs of every fused group: from one reference replay when args are given, else random."""
        needed = {n for g in groups if g.fused for n in g.inputs}
        if not needed:
            return {}
        if args:
            return self._replay_capture(graph, groups, args, needed)
        out = {}
        for name in needed:
            m = graph.meta[name]
            if name in graph.constants:
                out[name] = graph.constants[name]
            elif m.dtype.is_floating_point:
                out[name] = torch.randn(m.shape, dtype=m.dtype, device=m.device)
            else:
                out[name] = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        return out

    def _replay_capture(self, graph, groups, args, needed) -> dict[str, torch.Tensor]:
        written = {graph.meta[n].storage for node in graph.nodes for n in node.mutates}
        place = {}
        for g in groups:
            if g.fused:
                for n in g.inputs:
                    place.setdefault(max(g.nodes), []).append(n)
        env: dict[str, Any] = dict(graph.constants)
        env.update({name: args[pos] for name, pos in graph.inputs.items()})
        # Each intermediate is dropped after its last reader (or capture): a step's activations at
        # a large batch would not fit next to the model and its caches all at once.
        last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for n in [*node.inputs, *place.get(i, [])]:
                last_use[n] = i
        kept = set(env) | {x.name for x in graph.output_leaves if isinstance(x, Ref)}
        captured: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, node in enumerate(graph.nodes):
                for n in place.get(i, []):
                    if n not in captured and n in env:
                        v = env[n]
                        captured[n] = v.clone() if graph.meta[n].storage in written else v
                result = node.target(*_resolve(node.args, env, args), **_resolve(node.kwargs, env, args))
                for name, value in zip(node.out_leaves, tree_flatten(result)[0]):
                    if name is not None:
                        env[name] = value
                for n in [*node.inputs, *node.outputs]:
                    if last_use.get(n, i) <= i and n not in kept:
                        env.pop(n, None)
        self._first_output = tree_unflatten(
            [env[x.name] if isinstance(x, Ref) else x for x in graph.output_leaves], graph.output_spec)
        return captured

    def _callables(self, graph: SubGraph, g: Group, values: dict, args: tuple):
        """(fused, reference, make_inputs): fused / reference take an input list (graph value order
        of g.inputs); make_inputs(distinct) clones every tensor when distinct, else only the inputs
        the group writes in place (so repeated calls see the same values)."""
        scalars = {i: (args[i] if args else graph.scalars.get(i, float)(1)) for i in g.scalar_args}
        written = {n for i in g.nodes for n in graph.nodes[i].mutates}

        def make_inputs(distinct: bool = False) -> list:
            return [replica(values[n]) if distinct or n in written else values[n] for n in g.inputs]

        if g.kind == "pattern":
            params = self._pattern_params(g, args, graph)
            return (lambda inputs: _as_tuple(g.pattern.kernel(*inputs, **params)),
                    lambda inputs: _as_tuple(g.pattern.reference(*inputs, **params)), make_inputs)
        sub = graph.subgraph(g.nodes)
        scalar_values = [scalars[i] for i in g.scalar_args]
        full_args = list(args) if args else [graph.specialized.get(i) for i in range(graph.num_args)]
        for i, v in scalars.items():
            full_args[i] = v

        def reference(inputs):
            env = dict(zip(g.inputs, inputs))
            for node in sub.nodes:
                result = node.target(*_resolve(node.args, env, full_args), **_resolve(node.kwargs, env, full_args))
                for name, value in zip(node.out_leaves, tree_flatten(result)[0]):
                    if name is not None:
                        env[name] = value
            return tuple(env[n] for n in g.outputs)

        return (lambda inputs: g.compiled.fn(*inputs, *scalar_values)), reference, make_inputs

    @staticmethod
    def _pattern_params(g: Group, args: tuple, graph: SubGraph) -> dict:
        """The pattern's keyword params with runtime scalars resolved (to 1 without example args)."""
        return {k: (args[v.index] if args else graph.scalars.get(v.index, float)(1)) if isinstance(v, ScalarArg)
                else v for k, v in g.params.items()}

    def _decide_dynamic(self, graph: SubGraph, g: Group, values: dict, args: tuple) -> None:
        fused_fn, reference_fn, make_inputs = self._callables(graph, g, values, args)
        device = graph.meta[g.inputs[0]].device if g.inputs else "cpu"
        try:
            fused_out = fused_fn(make_inputs())
            if self.config.debug_mode:
                ranges = None
                if g.pattern is not None and g.pattern.stochastic:
                    ranges = g.pattern.output_ranges(*make_inputs(), **self._pattern_params(g, args, graph))
                self._validate(g, fused_out, reference_fn(make_inputs()), ranges)
        except Exception as e:
            if not self.config.fallback_on_error:
                raise
            log.warning("%s group falls back: %s", g.name, e)
            g.decision = Decision(False, f"kernel failed, unfused ops run instead: {e}")
            g.record.decision, g.record.reason = False, g.decision.reason
            return
        if g.kind == "pattern":
            try:
                g.record.bytes_moved = int(g.pattern.bytes_moved(*[values[n] for n in g.inputs], **{
                    k: v for k, v in g.params.items() if not isinstance(v, ScalarArg)}))
            except Exception as e:
                log.debug("pattern %s: bytes_moved failed: %s", g.name, e)
        if self.config.profile:
            key = cache_key("decision", g.name, g.compiled.key if g.compiled else g.name,
                            [(list(graph.meta[n].shape), str(graph.meta[n].dtype)) for n in g.inputs],
                            device_name(device))
            g.decision = self.heuristics.profile_and_decide(
                key, fused_fn, reference_fn, make_inputs, device,
                min_ratio=g.pattern.profile_ratio if g.pattern is not None else 0.0)
            g.record.t_fused, g.record.t_fallback = g.decision.t_fused, g.decision.t_fallback
            g.record.timing = g.decision.mode
        g.record.decision, g.record.reason = g.decision.fuse, g.decision.reason
        g.record.decided_by = g.decision.source

    def _validate(self, g: Group, fused: tuple, reference: tuple, ranges: list | None = None) -> None:
        """Values must match the reference; a stochastic pattern (kernel and reference draw
        different random numbers) is held to shapes, dtypes, finiteness and its output ranges."""
        if len(fused) != len(reference):
            raise ValueError(f"kernel returned {len(fused)} outputs, reference {len(reference)}")
        stochastic = g.pattern is not None and g.pattern.stochastic
        for name, a, b, bounds in zip(g.outputs, fused, reference, ranges or [None] * len(fused)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"output {name}: kernel gives {tuple(a.shape)} {a.dtype}, "
                                 f"reference {tuple(b.shape)} {b.dtype}")
            if stochastic:
                _check_sample(name, a, b, bounds)
            elif a.dtype.is_floating_point:
                rtol, atol = self.config.tolerances.get(str(a.dtype).removeprefix("torch."), (1e-4, 1e-5))
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"output {name}: {m}")
            elif not torch.equal(a, b):
                raise ValueError(f"output {name}: {(a != b).sum().item()} elements differ from the reference")

    # -- program -------------------------------------------------------------------------------
    # -- dispatch ------------------------------------------------------------------------------
    def dispatch(self, graph: SubGraph, *args):
        """Run `graph`'s program on `args` (the recorded function's positional args), compiling on
        first use. A new value of a specialised scalar, or tensors of other shapes / dtypes /
        strides, re-record the function (and that variant is compiled once)."""
        if len(args) != graph.num_args:
            raise TypeError(f"the recorded function takes {graph.num_args} positional args, got {len(args)}")
        variant = self._variant_key(graph, args)
        if variant is not None:
            key = (id(graph), variant)
            if key not in self._variants:
                if graph.source is None:
                    raise ValueError("arguments differ from the recording (" + self._mismatch(graph, args) +
                                     ") and the graph has no source function to re-record")
                from .record import record_with_output

                new, out = record_with_output(graph.source, *args, **graph.source_kwargs)
                self._variants[key] = new
                self._programs[(id(new),)] = self.compile(new)
                return out
            graph = self._variants[key]
        program = self._programs.get((id(graph),))
        if program is None:
            self._first_output = None
            program = self.compile(graph, *args)
            self._programs[(id(graph),)] = program
            if self._first_output is not None:  # the reference replay already ran this call
                out, self._first_output = self._first_output, None
                return out
        return program(*args)

    def program(self, graph: SubGraph) -> Program:
        """The Program dispatch runs for `graph` (compiled now, on random inputs, if it was not yet)."""
        if (id(graph),) not in self._programs:
            self._programs[(id(graph),)] = self.compile(graph)
        return self._programs[(id(graph),)]

    @staticmethod
    def _variant_key(graph: SubGraph, args: tuple):
        for pos, value in graph.specialized.items():
            if not (args[pos] is value or (type(args[pos]) is type(value) and args[pos] == value)):
                return ("spec", tuple((p, repr(args[p])) for p in sorted(graph.specialized)),
                        _tensor_signature(graph, args))
        for name, pos in graph.inputs.items():
            m, t = graph.meta[name], args[pos]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != m.shape or t.dtype != m.dtype \
                    or tuple(t.stride()) != m.stride:
                return ("spec", tuple((p, repr(args[p])) for p in sorted(graph.specialized)),
                        _tensor_signature(graph, args))
        return None

    @staticmethod
    def _mismatch(graph: SubGraph, args: tuple) -> str:
        for pos, value in graph.specialized.items():
            if args[pos] != value:
                return f"arg {pos} is {args[pos]!r}, recorded with {value!r}"
        for name, pos in graph.inputs.items():
            m, t = graph.meta[name], args[pos]
            return f"arg {pos}: {tuple(getattr(t, 'shape', ()))} vs recorded {m.shape}"
        return "unknown"

    def report(self) -> FusionReport:
        return self._report


def _tensor_signature(graph: SubGraph, args: tuple) -> tuple:
    return tuple((pos, tuple(a.shape), str(a.dtype), tuple(a.stride())) if isinstance(a, torch.Tensor)
                 else (pos, type(a).__name__) for pos, a in enumerate(args))


def replica(t: torch.Tensor) -> torch.Tensor:
    """A copy with t's sizes, strides and storage offset (in fresh storage of the same size):
    compiled launchers bake strides in, and Triton specialises on pointer alignment, so a plain
    .clone() of a view with gaps would be read with the wrong layout."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
    copy = storage.as_strided(t.size(), t.stride(), t.storage_offset())
    copy.copy_(t)
    return copy


def _shape_bucket(graph: SubGraph, inputs: list[str]) -> str:
    """The largest input's shape and dtype, e.g. "32x4096 bfloat16"."""
    if not inputs:
        return ""
    m = max((graph.meta[n] for n in inputs), key=lambda m: m.numel)
    return "x".join(map(str, m.shape)) + " " + str(m.dtype).removeprefix("torch.")


def _check_sample(name: str, sample: torch.Tensor, reference: torch.Tensor, bounds) -> None:
    if sample.dtype.is_floating_point and bool((torch.isnan(sample) & ~torch.isnan(reference)).any()):
        raise ValueError(f"output {name}: NaN where the reference has none")
    if bounds is not None and sample.numel():
        lo, hi = bounds
        if sample.dtype == torch.bool:
            sample = sample.to(torch.int8)
        if bool(((sample < lo) | (sample > hi)).any()):
            raise ValueError(f"output {name}: values in [{sample.min().item()}, {sample.max().item()}] "
                             f"outside the valid range [{lo}, {hi}]")


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)
