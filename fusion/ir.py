"""The recorded-graph IR: OpNode (one ATen op) and SubGraph (a straight-line program of them).

Values are named strings. A SubGraph's values are its inputs (the recorded function's positional
tensor arguments), its constants (tensors the function closed over, parameters and buffers such as
a KV cache, held by reference so replay reads and writes the very same storage) and the outputs of
its nodes. An in-place op gets a fresh output name for the tensor it mutated (SSA style), so later
reads depend on the write; writes visible only through aliases are ordered by `storage` ids.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten


@dataclass(frozen=True)
class Ref:
    """A tensor argument of an op, by value name."""

    name: str


@dataclass(frozen=True)
class ScalarArg:
    """A Python scalar taken at run time from positional argument `index` of the recorded function."""

    index: int


@dataclass(frozen=True)
class ValueMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]
    device: str
    storage: int  # same number = same storage (aliases); numbered per graph in recording order

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "stride": list(self.stride), "device": self.device, "storage": self.storage}


def _canonical(value: Any) -> Any:
    """A JSON-able, process-independent form of a non-tensor op argument."""
    if isinstance(value, Ref):
        return {"ref": value.name}
    if isinstance(value, ScalarArg):
        return {"scalar_arg": value.index}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, float):
        return repr(value)  # keeps inf/nan and full precision in the hash
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # dtypes, devices, layouts, memory formats


@dataclass
class OpNode:
    """One recorded ATen op.

    args/kwargs are templates: tensor arguments appear as Ref(value name), runtime scalars as
    ScalarArg(index); everything else is the literal recorded value. `inputs` lists the Ref names
    in argument order, `attrs` the non-tensor arguments by schema name (for matching and hashing),
    `mutates` the input names the op writes in place. `out_leaves` gives, for every leaf of the
    op's (flattened) return value, the output value name or None for a non-tensor leaf.
    """

    op: str
    target: Callable = field(repr=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    args: tuple
    kwargs: dict
    attrs: dict
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    mutates: tuple[str, ...] = ()
    out_leaves: tuple[str | None, ...] = ()

    def scalar_args(self) -> list[ScalarArg]:
        leaves, _ = tree_flatten((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, ScalarArg)]

    def to_dict(self) -> dict:
        return {"op": self.op, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "attrs": _canonical(self.attrs), "mutates": list(self.mutates),
                "shape": None if self.shape is None else list(self.shape),
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}


def _resolve(template: Any, env: dict[str, torch.Tensor], scalars: tuple) -> Any:
    def one(x):
        if isinstance(x, Ref):
            return env[x.name]
        if isinstance(x, ScalarArg):
            return scalars[x.index]
        return x

    return tree_map(one, template)


class SubGraph:
    """A recorded straight-line program of ATen ops.

    inputs:   value name -> positional index of the recorded function's argument.
    outputs:  the return value as pytree leaves (Ref for tensors, literals otherwise) + its spec.
    scalars:  positional index -> type, for Python scalars passed at run time (see ScalarArg).
    specialized: positional index -> value, for Python scalars baked into the graph.
    """

    def __init__(self, nodes: list[OpNode], inputs: dict[str, int], output_leaves: list,
                 output_spec: TreeSpec, constants: dict[str, torch.Tensor],
                 meta: dict[str, ValueMeta], scalars: dict[int, type] | None = None,
                 specialized: dict[int, Any] | None = None, num_args: int | None = None):
        self.nodes = nodes
        self.inputs = inputs
        self.output_leaves = output_leaves
        self.output_spec = output_spec
        self.constants = constants
        self.meta = meta
        self.scalars = dict(scalars or {})
        self.specialized = dict(specialized or {})
        self.num_args = num_args if num_args is not None else (
            max([*inputs.values(), *self.scalars, *self.specialized], default=-1) + 1)
        self.source: Callable | None = None  # the recorded function, to re-record on specialisation
        self.source_kwargs: dict = {}
        self._producer: dict[str, int] | None = None
        self._users: dict[str, list[int]] | None = None
        self._hash: str | None = None

    # -- structure -----------------------------------------------------------------------------
    @property
    def outputs(self) -> list[str]:
        return [x.name for x in self.output_leaves if isinstance(x, Ref)]

    def _index(self) -> None:
        producer: dict[str, int] = {}
        users: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                users.setdefault(name, [])
                if not users[name] or users[name][-1] != i:
                    users[name].append(i)
            for name in node.outputs:
                producer[name] = i
        self._producer, self._users = producer, users

    def producer(self, name: str) -> int | None:
        """Index of the node producing `name`; None for inputs and constants."""
        if self._producer is None:
            self._index()
        return self._producer.get(name)

    def users(self, name: str) -> list[int]:
        """Indices of the nodes reading `name`, ascending."""
        if self._users is None:
            self._index()
        return self._users.get(name, [])

    def producer_node(self, name: str) -> OpNode | None:
        i = self.producer(name)
        return None if i is None else self.nodes[i]

    def structural_hash(self) -> str:
        """sha256 over op types, attributes and topology; not over value names, constant identities
        or shapes (the kernel cache adds dtypes and shapes to its key), so two layers of a model hash
        alike and the hash is stable across processes."""
        if self._hash is not None:
            return self._hash
        index: dict[str, Any] = {}
        for name, pos in self.inputs.items():
            index[name] = ["in", pos]
        for k, name in enumerate(self.constants):
            index[name] = ["const", k]
        rows = []
        for i, node in enumerate(self.nodes):
            for j, name in enumerate(node.outputs):
                index[name] = [i, j]
            rows.append([node.op, _canonical(node.attrs), [index.get(n) for n in node.inputs],
                         len(node.outputs), [index.get(n) for n in node.mutates]])
        rows.append([index.get(x.name) if isinstance(x, Ref) else _canonical(x) for x in self.output_leaves])
        rows.append(sorted(self.specialized.items()))
        blob = json.dumps(rows, sort_keys=True, default=str).encode()
        self._hash = hashlib.sha256(blob).hexdigest()
        return self._hash

    def subgraph(self, node_indices: Iterable[int]) -> SubGraph:
        """The nodes `node_indices` as a graph of their own: external tensors become its inputs (in
        first-use order), every value read outside the group or returned becomes an output.
        ScalarArg indices keep referring to the parent graph's positional arguments."""
        chosen = sorted(set(node_indices))
        inside = {n for i in chosen for n in self.nodes[i].outputs}
        chosen_set = set(chosen)
        inputs: dict[str, int] = {}
        for i in chosen:
            for name in self.nodes[i].inputs:
                if name not in inside and name not in inputs:
                    inputs[name] = len(inputs)
        escaping = set(self.outputs)
        for name in inside:
            if any(u not in chosen_set for u in self.users(name)):
                escaping.add(name)
        outs = [Ref(n) for i in chosen for n in self.nodes[i].outputs if n in escaping]
        _, spec = tree_flatten(list(range(len(outs))))
        meta = {n: self.meta[n] for n in [*inputs, *inside]}
        return SubGraph([self.nodes[i] for i in chosen], inputs, outs, spec, {}, meta)

    # -- replay --------------------------------------------------------------------------------
    def execute(self, *args) -> Any:
        """Replay the recorded ops one by one on `args` (same positional args as the recorded
        function). This is the unfused reference and the fallback."""
        env: dict[str, Any] = dict(self.constants)
        for name, pos in self.inputs.items():
            env[name] = args[pos]
        with torch.no_grad():
            for node in self.nodes:
                result = node.target(*_resolve(node.args, env, args), **_resolve(node.kwargs, env, args))
                for name, value in zip(node.out_leaves, tree_flatten(result)[0]):
                    if name is not None:
                        env[name] = value
        out = [env[x.name] if isinstance(x, Ref) else x for x in self.output_leaves]
        return tree_unflatten(out, self.output_spec)

    # -- views and export ----------------------------------------------------------------------
    def to_networkx(self):
        """DiGraph over node indices; node attributes op/attrs/shape/dtype, edge attribute `value`."""
        import networkx as nx

        g = nx.DiGraph()
        for i, node in enumerate(self.nodes):
            g.add_node(i, op=node.op, attrs=node.attrs, shape=node.shape, dtype=node.dtype)
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                p = self.producer(name)
                if p is not None:
                    g.add_edge(p, i, value=name)
        return g

    def to_dict(self) -> dict:
        return {
            "hash": self.structural_hash(),
            "inputs": self.inputs,
            "constants": list(self.constants),
            "scalars": {str(k): v.__name__ for k, v in self.scalars.items()},
            "specialized": {str(k): _canonical(v) for k, v in self.specialized.items()},
            "outputs": [_canonical(x) for x in self.output_leaves],
            "nodes": [n.to_dict() for n in self.nodes],
            "values": {k: v.to_dict() for k, v in self.meta.items()},
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _label(self, node: OpNode) -> str:
        shape = "x".join(map(str, node.shape)) if node.shape is not None else "-"
        dtype = str(node.dtype).removeprefix("torch.") if node.dtype is not None else ""
        return f"{node.op.removeprefix('aten.')} [{shape} {dtype}]"

    def _edges(self):
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                p = self.producer(name)
                yield (f"n{p}" if p is not None else name), f"n{i}", name
        for name in self.outputs:
            p = self.producer(name)
            yield (f"n{p}" if p is not None else name), f"out_{name}", name

    def _sources(self) -> list[str]:
        used = {n for node in self.nodes for n in node.inputs} | set(self.outputs)
        return [n for n in [*self.inputs, *self.constants] if n in used]

    def to_dot(self) -> str:
        lines = ["digraph SubGraph {", "  rankdir=TB;", "  node [fontname=monospace, fontsize=10];"]
        for name in self._sources():
            kind = "input" if name in self.inputs else "const"
            lines.append(f'  "{name}" [shape=ellipse, label="{name} ({kind})"];')
        for i, node in enumerate(self.nodes):
            lines.append(f'  "n{i}" [shape=box, label="{self._label(node)}"];')
        for name in self.outputs:
            lines.append(f'  "out_{name}" [shape=doubleoctagon, label="out {name}"];')
        for src, dst, value in self._edges():
            lines.append(f'  "{src}" -> "{dst}" [label="{value}"];')
        lines.append("}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        lines = ["flowchart TD"]
        for name in self._sources():
            lines.append(f'  {name}(["{name}"])')
        for i, node in enumerate(self.nodes):
            lines.append(f'  n{i}["{self._label(node)}"]')
        for name in self.outputs:
            lines.append(f'  out_{name}[["out {name}"]]')
        for src, dst, value in self._edges():
            lines.append(f"  {src} -->|{value}| {dst}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"SubGraph({len(self.nodes)} nodes, {len(self.inputs)} inputs, "
                f"{len(self.constants)} constants, {len(self.outputs)} outputs, "
                f"hash={self.structural_hash()[:12]})")
