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

from difuse.patterns._rows import check_float, check_runtime_device, check_same_device, row_view  # noqa: E402


@triton.jit
def _swiglu_kernel(
    g_ptr, g_inner, g_so, g_si,
    u_ptr, u_inner, u_so, u_si,
    y_ptr,  # contiguous [rows, I]
    I, col_blocks,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g_row = (row // g_inner) * g_so + (row % g_inner) * g_si
    u_row = (row // u_inner) * u_so + (row % u_inner) * u_si
    g = tl.load(g_ptr + g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + u_row + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * I + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


def _swiglu_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 2k-4k values per program so each thread issues 16-byte loads."""
    block = min(4096, triton.next_power_of_2(max(width, 1)))
    return block, max(1, min(8, block // 512))


def _launch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_runtime_device(gate)
    width = gate.shape[-1]
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel() == 0:
        return y
    gv, uv = row_view(gate), row_view(up)
    block, num_warps = _swiglu_block(width)
    col_blocks = triton.cdiv(width, block)
    _swiglu_kernel[(gv.rows * col_blocks,)](
        gv.tensor, gv.inner, gv.stride_outer, gv.stride_inner,
        uv.tensor, uv.inner, uv.stride_outer, uv.stride_inner,
        y, width, col_blocks,
        BLOCK=block,
        num_warps=num_warps,
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
