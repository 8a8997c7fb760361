"""SwiGLU activation: silu(gate) * up, from two tensors or one fused [.., 2*I] gate_up tensor."""
import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


# ---------------------------------------------------------------------------------------------
# Fused kernel: a flat 1-D grid of (row, column block) programs, each streaming BLOCK contiguous
# values of gate and up (wide vector loads) and writing BLOCK outputs. The packed form reads the
# two halves of gate_up in place through the row stride, no chunk copy.
# Casts follow the reference: silu in fp32 rounded to the gate dtype, product rounded once.

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from difuse.patterns._rows import (  # noqa: E402
    PlanCache,
    cdiv,
    check_float,
    check_runtime_device,
    check_same_device,
    early_launch_options,
    next_pow2,
    row_view,
    stream_hint_options,
    tensor_key,
    wait_for_previous_kernel,
)


@triton.jit
def _swiglu_kernel(
    g_ptr, g_inner, g_so, g_si,
    u_ptr, u_inner, u_so, u_si,
    y_ptr,  # contiguous [rows, width]
    width, col_blocks,
    BLOCK: tl.constexpr,
    LOAD_EVICTION: tl.constexpr,  # "evict_first" or "" (the default)
    STORE_CACHE: tl.constexpr,  # ".cs" or ""
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g_row = (row // g_inner) * g_so + (row % g_inner) * g_si
    u_row = (row // u_inner) * u_so + (row % u_inner) * u_si
    g = tl.load(g_ptr + g_row + cols, mask=mask, other=0.0, eviction_policy=LOAD_EVICTION).to(tl.float32)
    u = tl.load(u_ptr + u_row + cols, mask=mask, other=0.0, eviction_policy=LOAD_EVICTION).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * width + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask, cache_modifier=STORE_CACHE)


# Values per program and per warp. At 256 per warp (8 per thread: one 16-byte load of each input)
# SwiGLU over 4096 x 12288 took 70.4 us on an H200, against 71.0 us at 512 per warp and 70.3 us
# for torch.compile; 32 and 1024 rows were faster too (bench/results/kernels-swiglu-warps-h200.log).
MAX_BLOCK = 2048
VALUES_PER_WARP = 256
# Each value is read once and written once: loads evict first, stores stream (.cs). On an H200 that
# took 32 x 12288 from 2.24 to 2.11 us (torch.compile 2.13) and left 4096 rows at 70.7
# (bench/results/tune-swiglu-stream-hints-h200.log); the step is measured with patterns.rms_norm's.
STREAM_HINTS = True


def _swiglu_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a program over one row's columns."""
    block = min(MAX_BLOCK, next_pow2(width))
    return block, max(1, min(16, block // VALUES_PER_WARP))


def _plan_swiglu(gate: torch.Tensor, up: torch.Tensor) -> tuple:
    check_runtime_device(gate)
    width = gate.shape[-1]
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    if gate.numel() == 0:
        return out_dtype, None
    gv, uv = row_view(gate), row_view(up)
    block, num_warps = _swiglu_block(width)
    col_blocks = cdiv(width, block)
    return out_dtype, dict(
        gate_copy=gv.tensor is not gate, gate_layout=(gv.inner, gv.stride_outer, gv.stride_inner),
        up_copy=uv.tensor is not up, up_layout=(uv.inner, uv.stride_outer, uv.stride_inner),
        grid=(gv.rows * col_blocks,), sizes=(width, col_blocks),
        constants=dict(BLOCK=block, num_warps=num_warps, **stream_hint_options(STREAM_HINTS),
                       **early_launch_options(gate.device)))


_PLANS = PlanCache()


def _launch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out_dtype, plan = _PLANS.get((tensor_key(gate), tensor_key(up)), lambda: _plan_swiglu(gate, up))
    y = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if plan is None:
        return y
    _swiglu_kernel[plan["grid"]](
        gate.contiguous() if plan["gate_copy"] else gate, *plan["gate_layout"],
        up.contiguous() if plan["up_copy"] else up, *plan["up_layout"],
        y, *plan["sizes"],
        **plan["constants"],
    )
    return y


def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up; gate and up [..., I] of equal shape, any strides."""
    check_float("gate", gate)
    check_float("up", up)
    check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension")
    return _launch_swiglu(gate, up)


def fused_swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton swiglu_fused: gate_up [..., 2I] -> silu(gate_up[..., :I]) * gate_up[..., I:]."""
    check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] with an even last dim, got {tuple(gate_up.shape)}")
    if gate_up.shape[-1] > 1 and gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    gate, up = gate_up.chunk(2, dim=-1)  # views [..., I] into the same storage
    return _launch_swiglu(gate, up)


def swiglu_bytes(gate: torch.Tensor, up: torch.Tensor) -> int:
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return gate.numel() * (gate.element_size() + up.element_size() + out_dtype.itemsize)


def swiglu_packed_bytes(gate_up: torch.Tensor) -> int:
    return gate_up.numel() * gate_up.element_size() * 3 // 2


# ---------------------------------------------------------------------------------------------
# Patterns: swiglu from silu(gate) * up or gate * sigmoid(gate) * up (operands in either order),
# and swiglu_packed when gate and up are the two halves of one split/chunk of gate_up.

from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import Walker, last_dim, no_overlap  # noqa: E402


def _match_swiglu_at(walker: Walker, anchor: int) -> dict | None:
    g = walker.graph
    node = g.nodes[anchor]
    gate = node.inputs[0] if node.inputs else None
    if gate is None:
        return None
    walker.taken.append(anchor)
    act = node.outputs[0]
    if node.op == "aten.sigmoid.default":
        times_gate = walker.sole_user(act, "aten.mul.Tensor")
        if times_gate is None or getattr(walker.other_operand(times_gate[1], act), "name", None) != gate:
            return None
        walker.taken.append(times_gate[0])
        act = times_gate[1].outputs[0]
    gated = walker.sole_user(act, "aten.mul.Tensor")
    if gated is None:
        return None
    up = walker.other_operand(gated[1], act)
    if getattr(up, "name", None) is None or walker.shape(up.name) != walker.shape(gate):
        return None
    walker.taken.append(gated[0])
    return {"gate": gate, "up": up.name, "out": gated[1].outputs[0]}


def _swiglu_matches(graph) -> list[tuple[Walker, dict]]:
    found = []
    for i, node in enumerate(graph.nodes):
        if node.op in ("aten.silu.default", "aten.sigmoid.default"):
            walker = Walker(graph)
            hit = _match_swiglu_at(walker, i)
            if hit:
                found.append((walker, hit))
    return found


def _packed_source(walker: Walker, gate: str, up: str) -> str | None:
    """gate_up when gate, up = gate_up.chunk(2, -1) (recorded as one split into two halves)."""
    split = walker.graph.producer_node(gate)
    if split is None or split.op != "aten.split.Tensor" or split.outputs != (gate, up):
        return None
    gate_up = split.inputs[0]
    shape = walker.shape(gate_up)
    dim = split.args[2] if len(split.args) > 2 else 0
    if not last_dim(dim, len(shape)) or shape[-1] != 2 * split.args[1]:
        return None
    walker.take(gate, "aten.split.Tensor")
    return gate_up


class SwiGLUPackedPattern(Pattern):
    name = "swiglu_packed"
    priority = 20

    def match(self, graph):
        matches = []
        for walker, hit in _swiglu_matches(graph):
            gate_up = _packed_source(walker, hit["gate"], hit["up"])
            if gate_up is not None and walker.closed([hit["out"]]):
                matches.append(walker.match(self.name, (gate_up,), (hit["out"],)))
        return no_overlap(matches)

    def reference(self, gate_up):
        return swiglu_fused(gate_up)

    def kernel(self, gate_up):
        return fused_swiglu_packed(gate_up)

    def bytes_moved(self, gate_up):
        return swiglu_packed_bytes(gate_up)


class SwiGLUPattern(Pattern):
    name = "swiglu"
    priority = 10

    def match(self, graph):
        matches = []
        for walker, hit in _swiglu_matches(graph):
            if walker.closed([hit["out"]]):
                matches.append(walker.match(self.name, (hit["gate"], hit["up"]), (hit["out"],)))
        return no_overlap(matches)

    def reference(self, gate, up):
        return swiglu(gate, up)

    def kernel(self, gate, up):
        return fused_swiglu(gate, up)

    def bytes_moved(self, gate, up):
        return swiglu_bytes(gate, up)


register(SwiGLUPackedPattern())
register(SwiGLUPattern())
