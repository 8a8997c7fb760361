"""How one model parameter is assembled from checkpoint tensors.

A Source is a checkpoint key (the tensor as is), a Cat (pieces concatenated along dim 0, e.g.
q|k|v into one QKV weight, gate|up into one gate-up weight) or a Stack (pieces stacked along a
new dim 0, e.g. per-expert weights into [E, ...]). Sources nest: expert gate-up weights are a
Stack of Cats. Each family's `checkpoint_map` returns {parameter name: Source}.

A Shard names the part of an assembled tensor one rank keeps (tensor / expert parallelism);
`assemble` maps it through the Source so that only those slices of the checkpoint are read.
"""
from dataclasses import dataclass
from typing import Callable, Union

import torch


@dataclass(frozen=True)
class Cat:
    parts: tuple["Source", ...]
    sizes: tuple[int, ...]  # dim-0 size of each part


@dataclass(frozen=True)
class Stack:
    parts: tuple["Source", ...]


Source = Union[str, Cat, Stack]


@dataclass(frozen=True)
class Shard:
    """The slices [start, stop) of dim `dim` kept, in ascending order, concatenated along `dim`."""
    dim: int
    ranges: tuple[tuple[int, int], ...]


def expected_shapes(source: Source, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The checkpoint shape each key must have for `source` to assemble a tensor of `shape`."""
    if isinstance(source, str):
        return {source: tuple(shape)}
    out = {}
    if isinstance(source, Cat):
        if len(source.parts) != len(source.sizes) or sum(source.sizes) != shape[0]:
            raise ValueError(f"packing sizes {source.sizes} do not assemble dim 0 of {tuple(shape)}")
        for part, size in zip(source.parts, source.sizes):
            out.update(expected_shapes(part, (size, *shape[1:])))
    else:
        if len(source.parts) != shape[0]:
            raise ValueError(f"{len(source.parts)} stacked parts do not assemble dim 0 of {tuple(shape)}")
        for part in source.parts:
            out.update(expected_shapes(part, tuple(shape[1:])))
    return out


def assemble(source: Source, read: Callable[[str, Shard | None], torch.Tensor],
             shard: Shard | None = None) -> torch.Tensor:
    """The tensor `source` describes, or only its `shard`; read(key, shard) reads a checkpoint tensor
    or the shard of it."""
    if isinstance(source, str):
        return read(source, shard)
    if isinstance(source, Cat):
        if shard is None or shard.dim > 0:
            return torch.cat([assemble(part, read, shard) for part in source.parts])
        pieces, offset = [], 0
        for part, size in zip(source.parts, source.sizes):
            inside = tuple((max(start, offset) - offset, min(stop, offset + size) - offset)
                           for start, stop in shard.ranges if start < offset + size and stop > offset)
            if inside:
                pieces.append(assemble(part, read, Shard(0, inside)))
            offset += size
        return torch.cat(pieces)
    if shard is not None and shard.dim == 0:
        return torch.stack([assemble(source.parts[i], read) for start, stop in shard.ranges for i in range(start, stop)])
    inner = None if shard is None else Shard(shard.dim - 1, shard.ranges)
    return torch.stack([assemble(part, read, inner) for part in source.parts])


def swiglu_sources(ours: str, theirs: str, inner: int) -> dict[str, Source]:
    """Our fused SwiGLUMLP (`gate_up`, `down`) from HF-style `gate_proj` / `up_proj` / `down_proj`."""
    return {ours + "gate_up.weight": Cat((theirs + "gate_proj.weight", theirs + "up_proj.weight"), (inner, inner)),
            ours + "down.weight": theirs + "down_proj.weight"}


def expert_sources(ours: str, theirs: str, num_experts: int, inner: int, fused: bool) -> dict[str, Source]:
    """Our stacked Experts (`w13` [E, 2I, H], `w2` [E, H, I]) from either dInfer's fused tensors
    `<theirs>w1` / `<theirs>w2` (same layout) or HF per-expert `experts.{e}.{gate,up,down}_proj`."""
    if fused:
        return {ours + "w13": theirs + "w1", ours + "w2": theirs + "w2"}
    experts = range(num_experts)
    gate_up = tuple(Cat((f"{theirs}experts.{e}.gate_proj.weight", f"{theirs}experts.{e}.up_proj.weight"), (inner, inner))
                    for e in experts)
    return {ours + "w13": Stack(gate_up),
            ours + "w2": Stack(tuple(f"{theirs}experts.{e}.down_proj.weight" for e in experts))}
