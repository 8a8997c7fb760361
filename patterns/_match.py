"""Helpers for the pattern matchers: walking a recorded SubGraph by value names.

Matchers start from an anchor op (rsqrt for RMSNorm, silu for SwiGLU, _softmax for confidence)
and walk producers and users, accepting the equivalent forms plain PyTorch records: operands of
commutative ops in either order, fp32 casts present or absent, scalars as literals or ScalarArgs.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from difuse.fusion.ir import OpNode, Ref, ScalarArg, SubGraph
from difuse.fusion.pattern import Match

CAST = "aten._to_copy.default"
COMMUTATIVE = {"aten.mul.Tensor", "aten.add.Tensor", "aten.eq.Tensor", "aten.bitwise_or.Tensor",
               "aten.bitwise_and.Tensor", "aten.logical_or.default", "aten.logical_and.default"}


class Walker:
    """A SubGraph plus the bookkeeping of one match attempt (nodes taken so far)."""

    def __init__(self, graph: SubGraph):
        self.graph = graph
        self.taken: list[int] = []

    # -- lookups -------------------------------------------------------------------------------
    def node(self, value: str) -> OpNode | None:
        return self.graph.producer_node(value)

    def take(self, value: str, op: str | Iterable[str]) -> OpNode | None:
        """The producer of `value` if it is `op` (one of), recorded as part of the match."""
        ops = (op,) if isinstance(op, str) else tuple(op)
        index = self.graph.producer(value)
        if index is None or self.graph.nodes[index].op not in ops:
            return None
        if index not in self.taken:
            self.taken.append(index)
        return self.graph.nodes[index]

    def dtype(self, value: str) -> torch.dtype:
        return self.graph.meta[value].dtype

    def shape(self, value: str) -> tuple[int, ...]:
        return self.graph.meta[value].shape

    def sole_user(self, value: str, op: str | Iterable[str]) -> tuple[int, OpNode] | None:
        """The single node reading `value`, if it is `op`."""
        ops = (op,) if isinstance(op, str) else tuple(op)
        users = self.graph.users(value)
        if len(users) != 1 or self.graph.nodes[users[0]].op not in ops:
            return None
        return users[0], self.graph.nodes[users[0]]

    def users(self, value: str) -> list[int]:
        return self.graph.users(value)

    # -- forms -----------------------------------------------------------------------------------
    def uncast(self, value: str, to: torch.dtype | None = None) -> str:
        """Step back over a pure dtype cast (`.float()`, `.to(dtype)`) producing `value`."""
        node = self.node(value)
        if node is None or node.op != CAST or not _pure_cast(node, to):
            return value
        self.take(value, CAST)
        return node.inputs[0]

    def other_operand(self, node: OpNode, known: str) -> Any:
        """For a binary op with `known` as one operand, the other one (commutative ops only swap)."""
        a, b = node.args[0], node.args[1]
        if isinstance(a, Ref) and a.name == known:
            return b
        if node.op in COMMUTATIVE and isinstance(b, Ref) and b.name == known:
            return a
        return None

    # -- finishing -------------------------------------------------------------------------------
    def closed(self, outputs: Iterable[str]) -> bool:
        """True when every value made by the taken nodes, other than `outputs`, is read only inside."""
        taken = set(self.taken)
        allowed = set(outputs)
        graph_outputs = set(self.graph.outputs)
        for i in taken:
            for value in self.graph.nodes[i].outputs:
                if value in allowed:
                    continue
                if value in graph_outputs or any(u not in taken for u in self.graph.users(value)):
                    return False
        return True

    def match(self, pattern: str, inputs: Iterable[str], outputs: Iterable[str], **params) -> Match:
        return Match(pattern, tuple(sorted(self.taken)), tuple(inputs), tuple(outputs), params)


def _pure_cast(node: OpNode, to: torch.dtype | None) -> bool:
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "memory_format")}
    if len(node.args) != 1 or any(v not in (None, False) for v in extra.values()):
        return False
    return to is None or node.kwargs.get("dtype") == to


def is_scalar(value: Any) -> bool:
    """A literal number or a runtime ScalarArg (never a tensor Ref)."""
    return isinstance(value, ScalarArg) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def last_dim(dims: Any, ndim: int) -> bool:
    """`dims` names only the last dimension of an ndim tensor (-1, ndim - 1, [-1], ...)."""
    if isinstance(dims, (list, tuple)):
        return len(dims) == 1 and last_dim(dims[0], ndim)
    return isinstance(dims, int) and dims in (-1, ndim - 1)


def no_overlap(matches: list[Match]) -> list[Match]:
    """Keep matches in order, dropping any that shares a node with an earlier one."""
    used: set[int] = set()
    kept = []
    for m in matches:
        if used.isdisjoint(m.nodes):
            kept.append(m)
            used.update(m.nodes)
    return kept
