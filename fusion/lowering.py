"""Lower a group of recorded ATen ops to a backend-neutral row kernel (RowKernel).

A row kernel runs one program per row of a row space S = [*L, N]: every value of the group is
  FULL  indexed by (row, column): shape broadcastable to S with last dim N,
  ROW   one per row, keepdim form [*L, 1] (or broadcastable to it), combinable with FULL values,
  ROWN  one per row, shape exactly L (a reduction without keepdim), combinable only with ROWN.
At most one reduction over the last dim (sum, mean, amax, amin, max.dim, argmax, or softmax /
log_softmax as row ops). Arithmetic follows torch: half-precision ops compute in fp32 and round
to their output dtype after every op, reductions accumulate in fp32, so fused results match eager.
Tensors from outside the group are loaded with strides expanded to the context that reads them
(S, [*L, 1] or L); runtime scalars (ScalarArg) become kernel arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .ir import Ref, ScalarArg, SubGraph

FULL, ROW, ROWN = "full", "row", "rown"

# op -> (kind, arity of tensor-like operands taken from args)
POINTWISE = {
    "aten.add.Tensor": "add", "aten.add.Scalar": "add", "aten.sub.Tensor": "sub", "aten.sub.Scalar": "sub",
    "aten.rsub.Scalar": "rsub", "aten.mul.Tensor": "mul", "aten.mul.Scalar": "mul", "aten.div.Tensor": "div",
    "aten.div.Scalar": "div", "aten.maximum.default": "maximum", "aten.minimum.default": "minimum",
    "aten.neg.default": "neg", "aten.exp.default": "exp", "aten.log.default": "log", "aten.sqrt.default": "sqrt",
    "aten.rsqrt.default": "rsqrt", "aten.abs.default": "abs", "aten.sigmoid.default": "sigmoid",
    "aten.silu.default": "silu", "aten.tanh.default": "tanh", "aten.relu.default": "relu",
    "aten.reciprocal.default": "reciprocal", "aten.sin.default": "sin", "aten.cos.default": "cos",
    "aten.erf.default": "erf", "aten.gelu.default": "gelu", "aten.pow.Tensor_Scalar": "pow",
    "aten.clamp.default": "clamp", "aten.clamp_min.default": "clamp_min", "aten.clamp_max.default": "clamp_max",
    "aten.eq.Tensor": "eq", "aten.eq.Scalar": "eq", "aten.ne.Tensor": "ne", "aten.ne.Scalar": "ne",
    "aten.lt.Tensor": "lt", "aten.lt.Scalar": "lt", "aten.le.Tensor": "le", "aten.le.Scalar": "le",
    "aten.gt.Tensor": "gt", "aten.gt.Scalar": "gt", "aten.ge.Tensor": "ge", "aten.ge.Scalar": "ge",
    "aten.logical_and.default": "and", "aten.logical_or.default": "or", "aten.logical_not.default": "not",
    "aten.bitwise_and.Tensor": "and", "aten.bitwise_or.Tensor": "or", "aten.bitwise_not.default": "not",
    "aten.where.self": "where", "aten._to_copy.default": "cast", "aten.clone.default": "identity",
    "aten.detach.default": "identity", "aten.alias.default": "identity",
    "aten.scalar_tensor.default": "scalar", "aten.full_like.default": "fill",
    "aten.zeros_like.default": "fill", "aten.ones_like.default": "fill",
}
VIEWS = {"aten.unsqueeze.default", "aten.squeeze.dim", "aten.view.default", "aten._unsafe_view.default",
         "aten.reshape.default"}
REDUCTIONS = {
    "aten.sum.dim_IntList": "sum", "aten.mean.dim": "mean", "aten.amax.default": "amax",
    "aten.amin.default": "amin", "aten.max.dim": "max", "aten.argmax.default": "argmax",
    "aten._softmax.default": "softmax", "aten._log_softmax.default": "log_softmax",
}
SUPPORTED_OPS = frozenset(POINTWISE) | frozenset(VIEWS) | frozenset(REDUCTIONS)
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}


class Unsupported(ValueError):
    """The group cannot become one row kernel (the reason says why)."""


@dataclass
class Operand:
    """A value read by an expression: a group value, an input load, a literal or a runtime scalar."""

    kind: str  # "var", "literal", "scalar"
    ref: Any  # var name, Python literal, or scalar-argument slot
    dtype: torch.dtype | None  # None for Python literals and runtime scalars
    py_type: type | None = None


@dataclass
class Expr:
    out: str  # kernel variable
    op: str  # pointwise kind, "view", "load", or a reduction kind
    operands: list[Operand]
    dtype: torch.dtype  # of `out`
    domain: str
    params: dict = field(default_factory=dict)
    out2: str | None = None  # second output (indices of max.dim)
    dtype2: torch.dtype | None = None


@dataclass
class KernelInput:
    value: str  # graph value name
    index: int  # kernel tensor-argument slot
    context: str  # FULL / ROW / ROWN
    strides: tuple[int, ...]  # expanded to the context shape (L strides, + column stride for FULL)
    dtype: torch.dtype


@dataclass
class KernelOutput:
    value: str
    var: str
    domain: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    row_strides: tuple[int, ...] = ()  # per leading dim
    col_stride: int = 0


@dataclass
class RowKernel:
    lead: tuple[int, ...]
    n_cols: int
    inputs: list[KernelInput]
    exprs: list[Expr]
    outputs: list[KernelOutput]
    scalar_args: list[int]  # positional indices of the graph's runtime scalars, in kernel order
    reduction: Expr | None
    input_values: list[str]  # graph value names, in kernel tensor-argument order

    @property
    def rows(self) -> int:
        r = 1
        for d in self.lead:
            r *= d
        return r

    def ancestors(self, var: str) -> set[str]:
        by_out = {e.out: e for e in self.exprs}
        by_out.update({e.out2: e for e in self.exprs if e.out2})
        seen, stack = set(), [var]
        while stack:
            v = stack.pop()
            e = by_out.get(v)
            if e is None or e.out in seen:
                continue
            seen.add(e.out)
            stack.extend(o.ref for o in e.operands if o.kind == "var")
        return seen


def _expand_strides(meta, target: tuple[int, ...]) -> tuple[int, ...]:
    shape, stride = meta.shape, meta.stride
    if len(shape) > len(target):
        raise Unsupported(f"operand of shape {shape} does not broadcast to {target}")
    pad = len(target) - len(shape)
    out = []
    for d, t in enumerate(target):
        if d < pad:
            out.append(0)
            continue
        s = shape[d - pad]
        if s == t:
            out.append(stride[d - pad] if t != 1 else 0)
        elif s == 1:
            out.append(0)
        else:
            raise Unsupported(f"operand of shape {shape} does not broadcast to {target}")
    return tuple(out)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _reduced_last_dim(node, ndim: int) -> bool:
    dims = node.attrs.get("dim")
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and dims in (-1, ndim - 1)


def row_space(graph: SubGraph, node_indices: list[int]) -> tuple[tuple[int, ...], int]:
    """(L, N) of a group: the reduction's input shape, else the largest output shape."""
    for i in node_indices:
        node = graph.nodes[i]
        if node.op in REDUCTIONS:
            shape = graph.meta[node.inputs[0]].shape
            return tuple(shape[:-1]), shape[-1]
    shapes = [graph.nodes[i].shape for i in node_indices if graph.nodes[i].shape]
    if not shapes:
        raise Unsupported("no tensor of rank >= 1 in the group")
    shape = max(shapes, key=lambda s: (_numel(s), len(s)))
    return tuple(shape[:-1]), shape[-1]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def lower(graph: SubGraph, node_indices: list[int]) -> RowKernel:
    """The row kernel of nodes `node_indices` of `graph`, or Unsupported."""
    chosen = sorted(node_indices)
    lead, n = row_space(graph, chosen)
    if n <= 1:
        raise Unsupported("the last dimension has size 1: nothing to fuse along rows")
    full_shape = (*lead, n)
    inside = {name: None for i in chosen for name in graph.nodes[i].outputs}
    chosen_set = set(chosen)
    var: dict[str, str] = {}  # graph value -> kernel variable
    domain: dict[str, str] = {}
    exprs: list[Expr] = []
    inputs: dict[tuple[str, str], KernelInput] = {}
    input_values: list[str] = []
    scalar_slots: list[int] = []
    reduction: Expr | None = None

    def operand(arg, ctx: str) -> Operand:
        if isinstance(arg, Ref):
            name = arg.name
            if name in var:
                return Operand("var", var[name], graph.meta[name].dtype)
            meta = graph.meta[name]
            target = {FULL: full_shape, ROW: (*lead, 1), ROWN: lead}[ctx]
            key = (name, ctx)
            if key not in inputs:
                if name not in input_values:
                    input_values.append(name)
                strides = _expand_strides(meta, target)
                if ctx == ROW:
                    strides = strides[:-1]
                inputs[key] = KernelInput(name, input_values.index(name), ctx, strides, meta.dtype)
                exprs.append(Expr(f"in{len(inputs) - 1}", "load", [], meta.dtype, ctx,
                                  {"input": len(inputs) - 1}))
            return Operand("var", f"in{list(inputs).index(key)}", meta.dtype)
        if isinstance(arg, ScalarArg):
            if arg.index not in scalar_slots:
                scalar_slots.append(arg.index)
            return Operand("scalar", scalar_slots.index(arg.index), None, graph.scalars.get(arg.index, float))
        if isinstance(arg, (bool, int, float)):
            return Operand("literal", arg, None, type(arg))
        raise Unsupported(f"unsupported operand {arg!r}")

    for i in chosen:
        node = graph.nodes[i]
        if node.mutates:
            raise Unsupported(f"{node.op} writes in place")
        out = node.outputs[0]
        meta = graph.meta[out]
        # 0-d values broadcast everywhere, so they do not constrain the domain
        in_domains = [domain[n] for n in node.inputs if n in domain and graph.meta[n].shape != ()]
        if node.op in REDUCTIONS:
            if reduction is not None:
                raise Unsupported("more than one reduction")
            src = node.inputs[0]
            if graph.meta[src].shape != full_shape or not _reduced_last_dim(node, len(full_shape)):
                raise Unsupported(f"{node.op} does not reduce the last dim of {full_shape}")
            if domain.get(src, FULL) != FULL:
                raise Unsupported("reduction of a per-row value")
            kind = REDUCTIONS[node.op]
            if kind not in ("sum", "mean") and not graph.meta[src].dtype.is_floating_point:
                raise Unsupported(f"{kind} of a non-floating tensor")
            dom = FULL if kind in ("softmax", "log_softmax") else (
                ROW if node.attrs.get("keepdim") else ROWN)
            e = Expr(f"t{i}", kind, [operand(node.args[0], FULL)], meta.dtype, dom,
                     {"acc_dtype": torch.float32 if graph.meta[src].dtype.is_floating_point else torch.int64})
            if kind == "max":
                e.out2, e.dtype2 = f"t{i}_1", graph.meta[node.outputs[1]].dtype
                var[node.outputs[1]], domain[node.outputs[1]] = e.out2, dom
            reduction = e
            exprs.append(e)
            var[out], domain[out] = e.out, dom
            continue
        if node.op in VIEWS:
            src = node.inputs[0] if node.inputs else None
            if src not in var:
                raise Unsupported(f"{node.op} of a tensor from outside the group")
            src_dom = domain[src]
            shape = meta.shape
            if src_dom in (ROW, ROWN) and shape in ((*lead, 1), lead):
                dom = ROW if shape == (*lead, 1) else ROWN
            elif src_dom == FULL and shape == graph.meta[src].shape and shape == full_shape:
                dom = FULL
            else:
                raise Unsupported(f"{node.op} changes the row space ({graph.meta[src].shape} -> {shape})")
            if any(u not in chosen_set for u in graph.users(out)) or out in graph.outputs:
                raise Unsupported(f"{node.op} result escapes the group (it would lose its aliasing)")
            var[out], domain[out] = var[src], dom
            continue
        kind = POINTWISE.get(node.op)
        if kind is None:
            raise Unsupported(f"{node.op} is not supported by the generic codegen")
        shape = meta.shape
        if ROWN in in_domains:
            if FULL in in_domains or ROW in in_domains or shape != lead:
                raise Unsupported("mixes per-row values of shape L with other shapes")
            dom = ROWN
        elif len(shape) >= 1 and _broadcasts(shape, full_shape) and shape[-1] == n:
            dom = FULL
        elif _broadcasts(shape, (*lead, 1)):
            dom = ROW
        else:
            raise Unsupported(f"{node.op} output {shape} is outside the row space {full_shape}")
        if dom == FULL and ROWN in in_domains:
            raise Unsupported("per-row value of shape L broadcast against full rows")
        params: dict[str, Any] = {}
        if kind in ("add", "sub", "rsub"):
            alpha = node.attrs.get("alpha", 1)
            if isinstance(alpha, ScalarArg) or alpha not in (1, 1.0):
                params["alpha"] = operand(alpha, dom)
            ops = [operand(node.args[0], dom), operand(node.args[1], dom)]
        elif kind == "pow":
            exponent = node.attrs["exponent"]
            if exponent not in (1, 2, 3, 4, 0.5, -0.5, -1, 1.0, 2.0, 3.0, 4.0):
                raise Unsupported(f"pow exponent {exponent!r}")
            params["exponent"] = exponent
            ops = [operand(node.args[0], dom)]
        elif kind in ("clamp", "clamp_min", "clamp_max"):
            ops = [operand(node.args[0], dom)]
            bounds = {"clamp": ("min", "max"), "clamp_min": ("min",), "clamp_max": ("max",)}[kind]
            for b in bounds:
                value = node.attrs.get(b)
                if value is not None:
                    params[b] = operand(value, dom)
        elif kind == "gelu":
            params["approximate"] = node.attrs.get("approximate", "none")
            ops = [operand(node.args[0], dom)]
        elif kind == "cast":
            extra = {k: v for k, v in node.attrs.items() if k not in ("dtype", "non_blocking") and v is not None}
            if any(k != "memory_format" or v != torch.preserve_format for k, v in extra.items()):
                raise Unsupported(f"_to_copy with {extra}")
            ops = [operand(node.args[0], dom)]
        elif kind == "scalar":
            ops = [operand(node.args[0], dom)]
        elif kind == "fill":
            value = {"aten.zeros_like.default": 0, "aten.ones_like.default": 1}.get(node.op)
            ops = [operand(node.attrs["fill_value"] if value is None else value, dom)]
        else:
            ops = [operand(a, dom) for a in node.args if isinstance(a, (Ref, ScalarArg, bool, int, float))]
        compute = _compute_dtype(kind, node, graph, meta.dtype)
        e = Expr(f"t{i}", kind, ops, meta.dtype, dom, params)
        e.params["compute"] = compute
        exprs.append(e)
        var[out], domain[out] = e.out, dom

    outputs = []
    escaping = [n for n in inside if n in graph.outputs or any(u not in chosen_set for u in graph.users(n))]
    for name in escaping:
        meta = graph.meta[name]
        dom = domain[name]
        if dom == FULL and meta.shape != full_shape:
            raise Unsupported(f"escaping value of shape {meta.shape} is not a full row space {full_shape}")
        if (dom == ROW and meta.shape != (*lead, 1)) or (dom == ROWN and meta.shape != lead):
            raise Unsupported(f"escaping per-row value of shape {meta.shape}")
        stride = meta.stride
        if dom == FULL:
            row_strides, col = stride[:-1], stride[-1]
        elif dom == ROW:
            row_strides, col = stride[:-1], 0
        else:
            row_strides, col = stride, 0
        outputs.append(KernelOutput(name, var[name], dom, meta.shape, stride, meta.dtype, tuple(row_strides), col))
    if not outputs:
        raise Unsupported("the group has no outputs")
    return RowKernel(lead, n, list(inputs.values()), exprs, outputs, scalar_slots, reduction, input_values)


def _compute_dtype(kind: str, node, graph: SubGraph, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes an op in (half precision computes in fp32)."""
    if kind in COMPARISONS or kind == "where":
        tensors = []
        for a in (node.args[:2] if kind != "where" else node.args[1:3]):
            if isinstance(a, Ref):
                m = graph.meta[a.name]
                tensors.append(torch.empty((1,) * len(m.shape), dtype=m.dtype))
            elif isinstance(a, ScalarArg):
                tensors.append(graph.scalars.get(a.index, float)(1))
            else:
                tensors.append(a)
        if len(tensors) == 1:
            tensors.append(tensors[0])
        dt = torch.result_type(*tensors) if any(isinstance(t, torch.Tensor) for t in tensors) else torch.float32
    else:
        dt = out_dtype
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
