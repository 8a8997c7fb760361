"""Tensor and expert parallelism over one torch.distributed process group (NCCL on GPUs, gloo on
CPU), applied to a model built on the meta device before its weights are read, so each rank
reads only its slices of the checkpoint.

With W ranks, rank r:
- tensor parallel: attention heads split (column-parallel QKV: q heads [r*Hq/W, (r+1)*Hq/W) and
  the KV heads they use; when there are fewer KV heads than ranks each KV head is replicated on
  the ranks that share it), row-parallel output projection; dense and shared-expert SwiGLU MLPs
  split along the inner size (column-parallel gate_up, row-parallel down); routed experts split
  along their inner size unless expert parallel; LM head split by vocabulary rows with the
  logits of the rows asked for all-gathered. One all-reduce after attention and one after the
  MLP (dense layers: two per layer), none inside the math modules.
- expert parallel: rank r holds experts [r*E/W, (r+1)*E/W) and computes their contributions for
  all tokens; the partial sums are combined by the layer's all-reduce (or, without tensor
  parallelism, by an all-reduce of the routed experts' output alone, everything else replicated).
Embeddings, norms and routers are replicated. Collectives are the functional c10d ops followed
by wait_tensor: ordinary out-of-place ops that a dispatch-level recorder sees and that NCCL can
replay inside a CUDA graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from difuse.models.layers import Attention, DecoderModel, SwiGLUMLP
from difuse.models.moe import Experts
from difuse.models.packing import Shard


@dataclass(frozen=True)
class ParallelConfig:
    """How to shard a model over `group` (None: the default process group)."""

    tensor_parallel: bool = True
    expert_parallel: bool = False
    group: dist.ProcessGroup | None = None

    @classmethod
    def from_sizes(cls, tensor_parallel: int = 1, expert_parallel: int = 1,
                   group: dist.ProcessGroup | None = None) -> ParallelConfig | None:
        """Command-line style sizes: each must be 1 or the group's size; None when both are 1."""
        if tensor_parallel == 1 and expert_parallel == 1:
            return None
        if not dist.is_initialized():
            raise ValueError(f"tensor_parallel={tensor_parallel} / expert_parallel={expert_parallel} need "
                             "torch.distributed initialised (launch with torchrun)")
        world = dist.get_world_size(group)
        for name, size in (("tensor_parallel", tensor_parallel), ("expert_parallel", expert_parallel)):
            if size not in (1, world):
                raise ValueError(f"{name}={size} must be 1 or the number of processes ({world})")
        return cls(tensor_parallel == world, expert_parallel == world, group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def group_name(self) -> str:
        return (self.group or dist.group.WORLD).group_name


def init_distributed(device: str | torch.device) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    if not joined yet: NCCL for CUDA, gloo otherwise. Returns this rank's device (cuda:LOCAL_RANK
    for a plain "cuda")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("tensor/expert parallelism needs several processes: launch with torchrun "
                             "(e.g. torchrun --nproc-per-node 2 -m difuse.runtime generate ...)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_reduce(x: torch.Tensor, config: ParallelConfig) -> torch.Tensor:
    out = torch.ops._c10d_functional.all_reduce(x, "sum", config.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def all_gather_last_dim(x: torch.Tensor, config: ParallelConfig) -> torch.Tensor:
    """x [..., n] on every rank -> [..., W * n], rank r's columns at [r * n, (r + 1) * n)."""
    W, n = config.world_size, x.shape[-1]
    rows = x.reshape(-1, n).contiguous()  # [R, n]
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(rows, W, config.group_name)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)  # [W * R, n]
    return gathered.view(W, -1, n).permute(1, 0, 2).reshape(*x.shape[:-1], W * n)


def shard_model(model: DecoderModel, config: ParallelConfig) -> dict[str, Shard]:
    """Shrink the (meta) model's parameters to this rank's slices, adjust head counts, install the
    collectives as forward hooks; returns {parameter name: the slice of the full tensor to read}."""
    has_experts = any(isinstance(m, Experts) for m in model.modules())
    if config.expert_parallel and not has_experts:
        raise ValueError(f"expert parallelism needs a mixture-of-experts model; {type(model).__name__} has no experts")
    sharder = _Sharder(model, config)
    for layer in model.layers:
        if config.tensor_parallel:
            sharder.attention(layer.attn)
            layer.attn.register_forward_hook(sharder.reduce_hook)
        if isinstance(layer.ffn, SwiGLUMLP):
            if config.tensor_parallel:
                sharder.mlp(layer.ffn)
                layer.ffn.register_forward_hook(sharder.reduce_hook)
            continue
        sharder.experts(layer.ffn.experts)
        if config.tensor_parallel:
            for shared in (m for m in layer.ffn.children() if isinstance(m, SwiGLUMLP)):
                sharder.mlp(shared)
            layer.ffn.register_forward_hook(sharder.reduce_hook)  # routed + shared partial sums
        else:
            layer.ffn.experts.register_forward_hook(sharder.reduce_hook)
    if config.tensor_parallel and model.vocab_size % config.world_size == 0:
        sharder.rows(model.lm_head, "weight", model.vocab_size)
        model.lm_head.register_forward_hook(sharder.gather_hook)
    model.num_kv_heads = model.layers[0].attn.n_kv_heads
    return sharder.shards


class _Sharder:
    def __init__(self, model: nn.Module, config: ParallelConfig):
        self.config = config
        self.rank, self.world = config.rank, config.world_size
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.shards: dict[str, Shard] = {}

    def reduce_hook(self, module, inputs, output):
        return all_reduce(output, self.config)

    def gather_hook(self, module, inputs, output):
        return all_gather_last_dim(output, self.config)

    def _split(self, size: int, what: str) -> tuple[int, int]:
        if size % self.world:
            raise ValueError(f"{what} {size} is not divisible by {self.world} ranks")
        local = size // self.world
        return self.rank * local, (self.rank + 1) * local

    def _shrink(self, module: nn.Module, attr: str, shard: Shard) -> None:
        full = getattr(module, attr)
        shape = list(full.shape)
        shape[shard.dim] = sum(stop - start for start, stop in shard.ranges)
        self.shards[self.names[id(full)]] = shard
        setattr(module, attr, nn.Parameter(torch.empty(shape, dtype=full.dtype, device=full.device),
                                           requires_grad=full.requires_grad))
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = shape

    def rows(self, module: nn.Module, attr: str, size: int) -> None:
        self._shrink(module, attr, Shard(0, (self._split(size, "vocabulary size"),)))

    def attention(self, attn: Attention) -> None:
        Hq, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q_start, q_stop = self._split(Hq, "number of attention heads")
        if Hkv % self.world == 0:
            kv_count = Hkv // self.world
            kv_start = self.rank * kv_count
        elif self.world % Hkv == 0:  # fewer KV heads than ranks: the ranks of one group share its KV head
            kv_count, kv_start = 1, q_start // (Hq // Hkv)
        else:
            raise ValueError(f"{Hkv} KV heads can be neither split over nor replicated on {self.world} ranks")
        k_offset, v_offset = Hq * D, (Hq + Hkv) * D
        self._shrink(attn.qkv, "weight", Shard(0, (
            (q_start * D, q_stop * D),
            (k_offset + kv_start * D, k_offset + (kv_start + kv_count) * D),
            (v_offset + kv_start * D, v_offset + (kv_start + kv_count) * D),
        )))
        self._shrink(attn.out, "weight", Shard(1, ((q_start * D, q_stop * D),)))
        attn.n_heads, attn.n_kv_heads = q_stop - q_start, kv_count

    def _inner(self, inner: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The gate rows and up rows of a stacked [gate I | up I] weight that this rank keeps."""
        start, stop = self._split(inner, "MLP inner size")
        return (start, stop), (inner + start, inner + stop)

    def mlp(self, mlp: SwiGLUMLP) -> None:
        inner = mlp.down.weight.shape[1]
        gate, up = self._inner(inner)
        self._shrink(mlp.gate_up, "weight", Shard(0, (gate, up)))
        self._shrink(mlp.down, "weight", Shard(1, (gate,)))

    def experts(self, experts: Experts) -> None:
        num_experts, _, inner = experts.w2.shape
        if self.config.expert_parallel:
            first, stop = self._split(num_experts, "number of experts")
            self._shrink(experts, "w13", Shard(0, ((first, stop),)))
            self._shrink(experts, "w2", Shard(0, ((first, stop),)))
            experts.first_expert = first
        elif self.config.tensor_parallel:
            gate, up = self._inner(inner)
            self._shrink(experts, "w13", Shard(1, (gate, up)))
            self._shrink(experts, "w2", Shard(2, (gate,)))
