"""The contract between the FusionScheduler and the pattern library.

A pattern recognises a piece of a recorded SubGraph and offers a fused kernel for it, a torch
reference with the same signature (used as fallback and to validate the kernel), and a model of the
bytes the fused kernel must move (for the report's achieved bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Match:
    """One occurrence of a pattern in a SubGraph.

    nodes:   indices (into SubGraph.nodes) of the recorded ops the fused kernel replaces.
    inputs:  value names passed positionally to `kernel` / `reference`, in order.
    outputs: value names the kernel returns, in order; every value produced by `nodes` and used
             outside them (or returned by the graph) must be listed here.
    params:  non-tensor keyword arguments (eps, threshold, mask id, ...). A value may be a
             `difuse.fusion.ir.ScalarArg`, which the scheduler resolves to the runtime scalar
             passed to `dispatch`, so changing it never recompiles.
    """

    pattern: str
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)


class Pattern:
    """Base class of every fused pattern. Subclasses set `name` and `priority` and implement all four."""

    name: str = ""
    priority: int = 0  # higher patterns are matched first; matches never overlap
    # The kernel samples random numbers the reference draws differently (same distribution, other
    # values): debug-mode validation then checks shapes, dtypes, NaNs and output_ranges, not values.
    stochastic: bool = False
    # Under the profile rule a fused kernel must beat fusion_ratio x the fallback's time. A pattern
    # that replaces one library call (same bytes, a better schedule) cannot be 20% faster and need
    # not be: it is kept below max(fusion_ratio, profile_ratio) x the fallback.
    profile_ratio: float = 0.0

    def match(self, graph) -> list[Match]:
        raise NotImplementedError

    def reference(self, *inputs, **params):
        """Plain PyTorch, same signature and return structure as `kernel`."""
        raise NotImplementedError

    def kernel(self, *inputs, **params):
        """The fused implementation (Triton / ninetoothed launch)."""
        raise NotImplementedError

    def bytes_moved(self, *inputs, **params) -> int:
        """Fewest bytes the fused kernel must read and write for these inputs."""
        raise NotImplementedError

    def output_ranges(self, *inputs, **params) -> list[tuple[float, float] | None] | None:
        """Closed value range of each output (None: unchecked), used to validate stochastic patterns."""
        return None


_REGISTRY: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    if pattern.name in _REGISTRY:
        raise ValueError(f"pattern {pattern.name!r} is registered twice")
    _REGISTRY[pattern.name] = pattern
    return pattern


def registered_patterns() -> list[Pattern]:
    """All registered patterns, highest priority first."""
    return sorted(_REGISTRY.values(), key=lambda p: -p.priority)


PatternFn = Callable[..., Any]
