"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (LLaDA/Llama order)."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused kernel. One program normalises BLOCK_M rows; rows up to 8192 wide stay whole in registers
# (one HBM read per element); wider rows are streamed twice in BLOCK_N chunks.
# The casts reproduce the reference exactly: statistics in fp32, `normed` rounded to the input
# dtype before the weight multiply, the product rounded once to the output dtype.

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

_WHOLE_ROW_MAX = 8192
_CHUNK = 4096


@triton.jit
def _row_offsets(rows, inner, stride_outer, stride_inner):
    rows = rows.to(tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_inner, x_so, x_si,  # input rows
    r_ptr, r_inner, r_so, r_si,  # residual rows (read only when HAS_RESIDUAL)
    w_ptr,  # weight [N]
    y_ptr,  # normed output, contiguous [rows, N]
    h_ptr,  # x + residual output, contiguous [rows, N] (written only when HAS_RESIDUAL)
    n_rows, N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    LOAD_EVICTION: tl.constexpr,  # "evict_first" or "" (the default)
    STORE_CACHE: tl.constexpr,  # ".cs" or ""
    WEIGHT_FIRST: tl.constexpr,  # whole rows: the weight loaded with x, not after the reduction
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_row = _row_offsets(rows, x_inner, x_so, x_si)[:, None]
    r_row = _row_offsets(rows, r_inner, r_so, r_si)[:, None]
    out_row = rows.to(tl.int64)[:, None] * N
    # `normed` is rounded to the dtype of the normalised tensor (x, or x + residual).
    norm_ty = h_ptr.dtype.element_ty if HAS_RESIDUAL else x_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)[None, :]
        mask = row_ok[:, None] & (cols < N)
        if WEIGHT_FIRST:
            w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
        x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0, eviction_policy=LOAD_EVICTION).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + r_row + cols, mask=mask, other=0.0, eviction_policy=LOAD_EVICTION).to(tl.float32)
            hidden = (x + r).to(norm_ty)
            tl.store(h_ptr + out_row + cols, hidden, mask=mask, cache_modifier=STORE_CACHE)
            x = hidden.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)[:, None]
        if not WEIGHT_FIRST:
            w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
        normed = (x * rstd).to(norm_ty).to(tl.float32)
        tl.store(y_ptr + out_row + cols, (normed * w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask,
                 cache_modifier=STORE_CACHE)
    else:
        sum_sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            mask = row_ok[:, None] & (cols < N)
            x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_ptr + r_row + cols, mask=mask, other=0.0).to(tl.float32)
                hidden = (x + r).to(norm_ty)
                tl.store(h_ptr + out_row + cols, hidden, mask=mask)
                x = hidden.to(tl.float32)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=1) / N + eps)[:, None]
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            mask = row_ok[:, None] & (cols < N)
            x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_ptr + r_row + cols, mask=mask, other=0.0).to(tl.float32)
                x = (x + r).to(norm_ty).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            normed = (x * rstd).to(norm_ty).to(tl.float32)
            tl.store(y_ptr + out_row + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def _check_eps(eps) -> float:
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative Python number, got {eps!r}")
    return float(eps)


# Values per program (rows narrower than this share a program) and per warp (16 per thread);
# bench.tune_launch norm sweeps both.
ROW_VALUES = 2048
VALUES_PER_WARP = 512
# Whole-row programs read every value once and write it once, so their loads ask L2 to evict first
# and their stores stream (.cs). On an H200 at 4096 rows RMSNorm took 17.1 instead of 18.0 us at
# hidden 4096 and 8.8 instead of 9.3 at 2048, Add+RMSNorm 17.0 instead of 17.6 at 2048 (unchanged
# at 4096); VALUES_PER_WARP 512 stayed best (bench/results/tune-norm-stream-hints-h200.log). With
# these and SwiGLU's hints LLaDA-8B's step took (with vs without) 4.665 vs 4.667 ms at batch 1, 13.62 vs
# 13.76 at 16, 51.85 vs 51.81 at 64 (bench/results/ab-llada-8b-*-stream-hints-h200.log): a consumer
# still finds a small output in L2.
STREAM_HINTS = True
# Whole rows: the weight's load issued before the reduction, its latency hidden behind it (38
# instead of 32 registers at hidden 2048 on sm_90). With False the weight is loaded after the
# reduction, and compiled for sm_90 it stays there: nothing hoists it (with a residual it could not
# pass the sum's store, which it might alias for all the compiler knows). Not yet timed on a GPU:
# python -m bench.tune_launch norm --grid "WEIGHT_FIRST=0,1".
WEIGHT_FIRST = False


def _plan_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> tuple:
    """Validate once per (shapes, strides, dtypes, device) and fix everything the launch needs."""
    check_float("x", x)
    check_float("weight", weight)
    if residual is not None:
        check_float("residual", residual)
        check_same_device(x=x, residual=residual, weight=weight)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    else:
        check_same_device(x=x, weight=weight)
    check_runtime_device(x)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [N] with N = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    N = x.shape[-1]
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(norm_dtype, weight.dtype)
    if x.numel() == 0:
        return out_dtype, norm_dtype, None
    xv = row_view(x)
    rv = row_view(residual) if residual is not None else xv
    if N <= _WHOLE_ROW_MAX:
        block_n, num_chunks = next_pow2(N), 1
    else:
        block_n, num_chunks = _CHUNK, cdiv(N, _CHUNK)
    # Narrow rows (head_dim norms) pack several rows per program to keep ~ROW_VALUES in flight.
    block_m = min(next_pow2(xv.rows), max(1, ROW_VALUES // block_n))
    launch = dict(
        x_copy=xv.tensor is not x, x_layout=(xv.inner, xv.stride_outer, xv.stride_inner),
        r_copy=residual is not None and rv.tensor is not residual,
        r_layout=(rv.inner, rv.stride_outer, rv.stride_inner),
        weight_copy=not weight.is_contiguous(), rows=xv.rows, N=N, grid=(cdiv(xv.rows, block_m),),
        constants=dict(HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                       NUM_CHUNKS=num_chunks, num_warps=max(1, min(16, block_m * block_n // VALUES_PER_WARP)),
                       WEIGHT_FIRST=WEIGHT_FIRST, **stream_hint_options(STREAM_HINTS),
                       **early_launch_options(x.device)),
    )
    return out_dtype, norm_dtype, launch


_PLANS = PlanCache()


def launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """Run the RMSNorm kernel: returns (normed, hidden) where hidden = x + residual (None without residual)."""
    eps = _check_eps(eps)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        check_float("x", x)
        check_float("weight", weight)
    key = (tensor_key(x), tensor_key(residual), tensor_key(weight))
    out_dtype, norm_dtype, plan = _PLANS.get(key, lambda: _plan_rms_norm(x, residual, weight))
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    hidden = torch.empty(x.shape, dtype=norm_dtype, device=x.device) if residual is not None else None
    if plan is None:
        return y, hidden
    xt = x.contiguous() if plan["x_copy"] else x
    rt = xt if residual is None else residual.contiguous() if plan["r_copy"] else residual
    _rms_norm_kernel[plan["grid"]](
        xt, *plan["x_layout"],
        rt, *plan["r_layout"],
        weight.contiguous() if plan["weight_copy"] else weight, y, hidden if hidden is not None else y,
        plan["rows"], plan["N"], eps,
        **plan["constants"],
    )
    return y, hidden


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm with the reference's semantics; x [..., N] of any strides, weight [N]."""
    return launch_rms_norm(x, None, weight, eps)[0]


def rms_norm_bytes(x: torch.Tensor, weight: torch.Tensor, eps: float = 0.0) -> int:
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.numel() * (x.element_size() + out_dtype.itemsize) + weight.numel() * weight.element_size()


# ---------------------------------------------------------------------------------------------
# Pattern: rms_norm, recognised in the recorded forms
#   weight * (x32 * rsqrt(mean(x32^2, -1, keepdim) + eps)).to(x.dtype)   (x32 = x.float())
#   with x32*x32 for the square, x32 / sqrt(...) for the scale, either operand order of the
#   multiplies, and the casts absent when x is fp32.

from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import CAST, Walker, is_scalar, last_dim, no_overlap  # noqa: E402


def match_rms_norm_at(walker: Walker, anchor: int) -> dict | None:
    """Match the RMSNorm chain around the rsqrt/sqrt node `anchor`. Returns x, weight, eps, out."""
    g = walker.graph
    scale_node = g.nodes[anchor]
    if scale_node.op not in ("aten.rsqrt.default", "aten.sqrt.default"):
        return None
    walker.taken.append(anchor)
    add = walker.take(scale_node.inputs[0], ("aten.add.Tensor", "aten.add.Scalar"))
    if add is None or len(add.inputs) != 1 or not is_scalar(add.args[1]) or add.kwargs.get("alpha", 1) != 1:
        return None
    eps = add.args[1]
    mean = walker.take(add.inputs[0], "aten.mean.dim")
    if mean is None or len(mean.args) < 3 or mean.args[2] is not True or mean.kwargs.get("dtype") is not None:
        return None
    square = walker.take(mean.inputs[0], ("aten.pow.Tensor_Scalar", "aten.mul.Tensor"))
    if square is None:
        return None
    if square.op == "aten.pow.Tensor_Scalar":
        if square.args[1] != 2:
            return None
        x32 = square.inputs[0]
    else:
        if len(square.inputs) != 2 or square.inputs[0] != square.inputs[1]:
            return None
        x32 = square.inputs[0]
    ndim = len(walker.shape(x32))
    if not last_dim(mean.args[1], ndim) or walker.dtype(x32) != torch.float32:
        return None
    scaled = walker.sole_user(scale_node.outputs[0], "aten.div.Tensor" if scale_node.op == "aten.sqrt.default"
                              else "aten.mul.Tensor")
    if scaled is None:
        return None
    index, node = scaled
    scale = scale_node.outputs[0]
    if node.op == "aten.mul.Tensor":
        other = walker.other_operand(node, scale)
    else:  # x32 / sqrt(...): the divisor must be the scale
        other = node.args[0] if getattr(node.args[1], "name", None) == scale else None
    if getattr(other, "name", None) != x32:
        return None
    walker.taken.append(index)
    x = walker.uncast(x32, torch.float32)
    normed = node.outputs[0]
    if walker.dtype(x) != torch.float32:
        cast = walker.sole_user(normed, CAST)
        if cast is None or cast[1].kwargs.get("dtype") != walker.dtype(x):
            return None
        walker.taken.append(cast[0])
        normed = cast[1].outputs[0]
    apply = walker.sole_user(normed, "aten.mul.Tensor")
    if apply is None:
        return None
    weight = walker.other_operand(apply[1], normed)
    if getattr(weight, "name", None) is None or walker.shape(weight.name) != (walker.shape(x)[-1],):
        return None
    if weight.name in {v for i in walker.taken for v in g.nodes[i].outputs}:
        return None
    walker.taken.append(apply[0])
    return {"x": x, "weight": weight.name, "eps": eps, "out": apply[1].outputs[0]}


def rms_norm_anchors(graph) -> list[int]:
    return [i for i, n in enumerate(graph.nodes) if n.op in ("aten.rsqrt.default", "aten.sqrt.default")]


class RMSNormPattern(Pattern):
    name = "rms_norm"
    priority = 10

    def match(self, graph):
        matches = []
        for anchor in rms_norm_anchors(graph):
            walker = Walker(graph)
            found = match_rms_norm_at(walker, anchor)
            if found and walker.closed([found["out"]]):
                matches.append(walker.match(self.name, (found["x"], found["weight"]), (found["out"],),
                                            eps=found["eps"]))
        return no_overlap(matches)

    def reference(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def kernel(self, x, weight, eps):
        return fused_rms_norm(x, weight, eps)

    def bytes_moved(self, x, weight, eps=0.0):
        return rms_norm_bytes(x, weight, eps)


register(RMSNormPattern())
