"""Shared checks of the pattern tests: per-dtype tolerances and running a Match on real values."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

from difuse.fusion.ir import Ref, ScalarArg
from difuse.fusion.record import record

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Elementwise results may differ from torch by one rounding of the output dtype (Triton's
# rsqrt/sigmoid and the interpreter's bf16 casts are not bit-identical to ATen's).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rounding: torch.dtype | None = None) -> None:
    """`rounding`: the narrowest dtype an intermediate is rounded to (default: the output dtype)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[rounding or expected.dtype])


def graph_values(graph, args) -> dict[str, torch.Tensor]:
    """Replay a recorded graph on `args`, keeping every intermediate value by name."""
    env = dict(graph.constants)
    env.update({name: args[pos] for name, pos in graph.inputs.items()})

    def resolve(x):
        if isinstance(x, Ref):
            return env[x.name]
        if isinstance(x, ScalarArg):
            return args[x.index]
        return x

    for node in graph.nodes:
        result = node.target(*tree_map(resolve, node.args), **tree_map(resolve, node.kwargs))
        for name, value in zip(node.out_leaves, tree_flatten(result)[0]):
            if name is not None:
                env[name] = value
    return env


def resolve_params(params: dict, args) -> dict:
    return {k: args[v.index] if isinstance(v, ScalarArg) else v for k, v in params.items()}


def check_match_runs(pattern, fn, args, expect_all_nodes: bool = True):
    """Record fn(*args), match `pattern`, and run its kernel on the matched values: the outputs
    must equal the graph's. Returns the (single) Match."""
    graph = record(fn, *args)
    matches = pattern.match(graph)
    assert len(matches) == 1, matches
    match = matches[0]
    if expect_all_nodes:
        assert match.nodes == tuple(range(len(graph.nodes))), (match.nodes, len(graph.nodes))
    env = graph_values(graph, args)
    inputs = [env[name] for name in match.inputs]
    out = pattern.kernel(*inputs, **resolve_params(match.params, args))
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(match.outputs)
    for value, name in zip(outs, match.outputs):
        assert_close(value, env[name])
    return match
