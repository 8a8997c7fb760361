"""Record ordinary PyTorch code into a SubGraph at the ATen level, with a TorchDispatchMode.

`record(fn, *args, **kwargs)` runs `fn` once for real (its side effects happen exactly as in one
eager call) and logs every ATen op below autograd. Then, for every Python int/float positional
argument, it records `fn` again under FakeTensorMode (no kernels run, no state changes, no RNG
draws) with a perturbed value and compares the two graphs:
- the graphs are identical except for literals that equal the argument in both runs: those
  literals become ScalarArg(i) and the scalar is a runtime argument (changing it never recompiles);
- anything else differs (structure, shapes, a literal derived from the scalar such as 1/T): the
  scalar is specialised, its value is part of the graph's key, and dispatch re-records for a new one.
All scalars are perturbed together first, so recording costs one eager and two fake runs unless
that is inconclusive. Tensor keyword arguments are held as constants and scalar keyword arguments
are baked in.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from .ir import OpNode, Ref, ScalarArg, SubGraph, ValueMeta

_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}


class RecordingError(RuntimeError):
    pass


class _Recorder(TorchDispatchMode):
    def __init__(self, args: tuple, fake: bool):
        super().__init__()
        self.fake = fake
        # Intermediates are not kept alive (a large step's activations would not fit twice): a name
        # leaves with its tensor, and a storage id with the last named tensor on that storage, so
        # a new tensor reusing a dead one's id or memory is never taken for it.
        self.names: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.nodes: list[OpNode] = []
        self.meta: dict[str, ValueMeta] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, int] = {}
        self.storages: dict[int, int] = {}  # data_ptr of a live storage -> storage id
        self.storage_tensors: dict[int, int] = {}  # data_ptr -> live named tensors on it
        self.storage_count = 0
        self.counter = 0
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a in self.names:  # the same tensor passed twice: the first position names it
                    continue
                name = f"arg{pos}"
                self.inputs[name] = pos
                self._bind(a, name)

    def _storage_id(self, t: torch.Tensor) -> int:
        if self.fake:
            return -1
        self.storage_count += 1
        if not t.untyped_storage().nbytes():
            return self.storage_count - 1  # empty: aliases nothing
        key = t.untyped_storage().data_ptr()
        if key not in self.storages:
            self.storages[key] = self.storage_count - 1
        self.storage_tensors[key] = self.storage_tensors.get(key, 0) + 1
        weakref.finalize(t, self._release_storage, key)
        return self.storages[key]

    def _release_storage(self, key: int) -> None:
        self.storage_tensors[key] -= 1
        if not self.storage_tensors[key]:
            del self.storage_tensors[key], self.storages[key]

    def _bind(self, t: torch.Tensor, name: str) -> None:
        self.names[t] = name
        self.meta[name] = ValueMeta(tuple(t.shape), t.dtype, tuple(t.stride()), str(t.device),
                                    self._storage_id(t))

    def name_of(self, t: torch.Tensor) -> str:
        name = self.names.get(t)
        if name is None:  # a tensor from outside: parameter, buffer, cache -- kept by reference
            name = f"c{len(self.constants)}"
            self.constants[name] = t
            self._bind(t, name)
        return name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries (device, layout): nothing to replay
            return func(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # Under inference_mode composite ops (aten.to, softmax.int, __or__) arrive undecomposed;
            # decomposing them here records the same graph as under no_grad, so patterns match.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in _HOST_SYNC_OPS:
            raise RecordingError(
                f"{func} reads device data on the host (.item(), bool(tensor), nonzero, ...): a "
                "recorded step must keep its decisions on the device (use torch.where / masks)")
        inputs: list[str] = []

        def template(x):
            if isinstance(x, torch.Tensor):
                name = self.name_of(x)
                inputs.append(name)
                return Ref(name)
            return x

        args_t = tree_map(template, args)
        kwargs_t = tree_map(template, kwargs)
        mutated = []
        schema_args = func._schema.arguments
        for k, a in enumerate(schema_args):
            value = args[k] if k < len(args) else kwargs.get(a.name)
            if a.alias_info is not None and a.alias_info.is_write and isinstance(value, torch.Tensor):
                mutated.append(self.names[value])
        attrs = {}
        for k, a in enumerate(schema_args):
            value = args_t[k] if k < len(args_t) else kwargs_t.get(a.name, a.default_value)
            if not _has_ref(value):
                attrs[a.name] = value

        out = func(*args, **kwargs)
        if isinstance(out, (bool, int, float)):  # e.g. aten.equal, aten.is_nonzero
            raise RecordingError(f"{func} returns a Python {type(out).__name__} computed from device data: a "
                                 "recorded step must keep its decisions on the device (use torch.where / masks)")

        leaves = tree_flatten(out)[0]
        out_leaves = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                name = f"v{self.counter}"
                self.counter += 1
                self._bind(leaf, name)
                out_leaves.append(name)
            else:
                out_leaves.append(None)
        first = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
        self.nodes.append(OpNode(
            op=_op_name(func), target=func, inputs=tuple(inputs),
            outputs=tuple(n for n in out_leaves if n is not None), args=tuple(args_t), kwargs=kwargs_t,
            attrs=attrs, shape=None if first is None else tuple(first.shape),
            dtype=None if first is None else first.dtype, mutates=tuple(mutated),
            out_leaves=tuple(out_leaves)))
        return out


def _has_ref(x) -> bool:
    return any(isinstance(leaf, Ref) for leaf in tree_flatten(x)[0])


def _op_name(func) -> str:
    return str(func)  # e.g. "aten.mul.Tensor"


def _run(fn: Callable, args: tuple, kwargs: dict, fake: bool) -> tuple[SubGraph, Any]:
    for pos, a in enumerate(args):
        if isinstance(a, (list, tuple, dict)) and any(isinstance(x, torch.Tensor) for x in tree_flatten(a)[0]):
            raise TypeError(f"argument {pos} holds tensors inside a {type(a).__name__}: pass every "
                            "runtime tensor as a top-level positional argument")
    with torch.no_grad():
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
                recorder = _Recorder(fake_args, fake)
                with recorder:
                    out = fn(*fake_args, **kwargs)
        else:
            recorder = _Recorder(args, fake)
            with recorder:
                out = fn(*args, **kwargs)
    leaves, spec = tree_flatten(out)
    output_leaves = [Ref(recorder.name_of(x)) if isinstance(x, torch.Tensor) else x for x in leaves]
    graph = SubGraph(recorder.nodes, recorder.inputs, output_leaves, spec, recorder.constants,
                     recorder.meta, num_args=len(args))
    return graph, out


def _perturbations(value) -> tuple:
    """A nearby value and one of the other sign: a scalar that steers Python control flow (such as
    `if temperature > 0`) usually shows it in one of the two."""
    if isinstance(value, int):
        return value + 1, -value - 1
    if not math.isfinite(value):
        return 0.5, -0.5
    return value * 1.5 + 0.25, -value - 0.5


def _literal_paths(graph: SubGraph) -> list:
    """Every non-tensor literal of every node argument, in a fixed order."""
    return [tree_flatten((node.args, node.kwargs))[0] for node in graph.nodes]


def _same_structure(a: SubGraph, b: SubGraph) -> bool:
    if len(a.nodes) != len(b.nodes) or a.inputs != b.inputs or list(a.constants) != list(b.constants):
        return False
    if a.output_spec != b.output_spec or a.output_leaves != b.output_leaves:
        return False
    for x, y in zip(a.nodes, b.nodes):
        if x.op != y.op or x.inputs != y.inputs or x.outputs != y.outputs:
            return False
    for name, m in a.meta.items():
        n = b.meta.get(name)
        if n is None or (m.shape, m.dtype, m.stride) != (n.shape, n.dtype, n.stride):
            return False
    return True


def _tracked_positions(base: SubGraph, other: SubGraph, trials: dict[int, tuple]) -> dict[int, list] | None:
    """For scalars perturbed together (arg position -> (value, perturbed value)): the (node, leaf)
    positions whose literal equals each scalar in both recordings; None when the recordings differ
    in any other way, or a literal cannot be told apart between two scalars."""
    if not _same_structure(base, other):
        return None
    found: dict[int, list] = {pos: [] for pos in trials}
    for i, (xs, ys) in enumerate(zip(_literal_paths(base), _literal_paths(other))):
        if len(xs) != len(ys):
            return None
        for j, (x, y) in enumerate(zip(xs, ys)):
            if isinstance(x, Ref) or _equal(x, y):
                continue
            owners = [pos for pos, (value, perturbed) in trials.items()
                      if type(x) is type(value) and type(y) is type(value) and _equal(x, value) and _equal(y, perturbed)]
            if len(owners) != 1:
                return None
            found[owners[0]].append((i, j))
    return found


def _equal(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:
        return False


def _substitute(graph: SubGraph, positions: dict[tuple[int, int], ScalarArg]) -> None:
    from torch.utils._pytree import tree_unflatten

    by_node: dict[int, dict[int, ScalarArg]] = {}
    for (i, j), s in positions.items():
        by_node.setdefault(i, {})[j] = s
    for i, subs in by_node.items():
        node = graph.nodes[i]
        leaves, spec = tree_flatten((node.args, node.kwargs))
        for j, s in subs.items():
            leaves[j] = s
        node.args, node.kwargs = tree_unflatten(leaves, spec)
        node.args = tuple(node.args)
        schema = node.target._schema.arguments
        for k, a in enumerate(schema):
            if a.name in node.attrs:
                node.attrs[a.name] = node.args[k] if k < len(node.args) else node.kwargs.get(a.name, node.attrs[a.name])


def _classify_scalars(graph: SubGraph, fn: Callable, args: tuple, kwargs: dict) -> dict[int, list] | None:
    """pos -> literal positions for every runtime scalar; the others go into graph.specialized.
    All scalars are perturbed together first (two fake recordings in all); only when that is
    inconclusive is each one perturbed alone."""
    candidates = [pos for pos, v in enumerate(args) if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def attempt(positions: list[int]) -> dict[int, list] | None:
        result: dict[int, list] | None = None
        for family in range(2):
            trials = {pos: (args[pos], _perturbations(args[pos])[family]) for pos in positions}
            trial_args = list(args)
            for pos, (_, perturbed) in trials.items():
                trial_args[pos] = perturbed
            try:
                other, _ = _run(fn, tuple(trial_args), kwargs, fake=True)
                found = _tracked_positions(graph, other, trials)
            except Exception:  # e.g. a perturbed value out of range for an index
                found = None
            if found is None or (result is not None and found != result):
                return None
            result = found
        return result

    tracked = attempt(candidates) if len(candidates) > 1 else None
    if tracked is None:
        tracked = {}
        for pos in candidates:
            alone = attempt([pos])
            if alone is None:
                graph.specialized[pos] = args[pos]
            else:
                tracked.update(alone)
    return tracked


def record_with_output(fn: Callable, *args, **kwargs) -> tuple[SubGraph, Any]:
    """record(), also returning what the eager run returned."""
    graph, out = _run(fn, args, kwargs, fake=False)
    positions: dict[tuple[int, int], ScalarArg] = {}
    for pos, found in _classify_scalars(graph, fn, args, kwargs).items():
        if found:  # a scalar that appears nowhere is neither runtime nor specialised
            graph.scalars[pos] = type(args[pos])
            positions.update({p: ScalarArg(pos) for p in found})
    for pos, value in enumerate(args):  # None, bool, str, dtype, ...: baked in
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            graph.specialized[pos] = value
    _substitute(graph, positions)
    graph._hash = None
    graph.source, graph.source_kwargs = fn, kwargs
    return graph, out


def record(fn: Callable, *args, **kwargs) -> SubGraph:
    """Record `fn(*args, **kwargs)` (run once eagerly) into a SubGraph. See the module docstring."""
    return record_with_output(fn, *args, **kwargs)[0]
