"""Rotary position embedding, rotate-half (NeoX/HF) layout, with partial rotary.

x: [B, T, H, D]; cos, sin: [B or 1, T, R] in fp32 with R <= D even. The first R features of every
head are rotated, the remaining D - R pass through. Computed in fp32, returned in x's dtype.
"""
import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    x32 = x.float()
    x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R]: broadcast over heads
    out = torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused kernel: one program per block of consecutive (b, t) positions and block of heads, held as one
# [positions, heads, features] tile so every load of the program is issued before any store (no
# per-position control flow serialising them); cos/sin [R] are read once per position and broadcast
# over heads. Each head row is loaded as three contiguous pieces, x1 = x[:R/2], x2 = x[R/2:R] and the
# pass-through x[R:], so every load and store is a wide vector access and the rotate-half partner
# needs no second load. With NORM the per-head RMSNorm of qk_norm runs first on the row already in
# registers (qk_norm_rope: one read and one write of q/k instead of two each).
# Every value is read once and written once: loads ask L2 to evict them first and stores stream
# (.cs). On an H200 at 4096 rows that took rope from 18.8 to 17.8 us and qk_norm_rope from 20.4 to
# 19.0 (bench/results/rope-cache-hints-h200.log); either hint alone gained little. rope_kv_write,
# which took 36.0 or 40.1 us depending on the harness, takes 37.3-37.5 in each.

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
    sm_count,
    tensor_key,
    wait_for_previous_kernel,
)


@triton.jit
def _norm_rope_kernel(
    x_ptr, x_sb, x_st, x_sh,  # [B, T, H, D], unit stride in D
    w_ptr,  # norm weight [D] (read only when NORM)
    cos_ptr, sin_ptr, cs_sb, cs_st,  # [B or 1, T, R] fp32, unit stride in R
    y_ptr, y_sb, y_st, y_sh,  # out[b, t', h, :] with t' = rows[t] when ROWS, else t; unit stride in D
    rows_ptr, n_rows,  # [T] destinations in [0, n_rows) (read only when ROWS)
    v_ptr, v_sb, v_st, v_sh, vy_ptr,  # passenger [B, T, H, D] copied to vy[b, t', h] (y's strides)
    T, H, D, half, eps,  # half = R / 2
    n_pos,  # B * T
    NORM: tl.constexpr,
    HAS_PASS: tl.constexpr,  # R < D
    ROWS: tl.constexpr,
    PASSENGER: tl.constexpr,
    BLOCK_POS: tl.constexpr,  # consecutive positions per program, one tile: all their loads issue together
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # the passenger's row
    PDL: tl.constexpr,
):
    """A [BLOCK_POS, BLOCK_H, features] tile: positions x heads tile program_id(1) x head features."""
    wait_for_previous_kernel(PDL)
    pos = tl.program_id(0) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    pos_ok = pos < n_pos
    b = (pos // T).to(tl.int64)[:, None, None]  # [P, 1, 1]
    t = (pos % T).to(tl.int64)[:, None, None]
    if ROWS:
        # A destination outside the buffer is skipped (index_copy_ would raise): never a stray write.
        t_out = tl.load(rows_ptr + t, mask=pos_ok[:, None, None], other=-1).to(tl.int64)
        out_ok = pos_ok[:, None, None] & (t_out >= 0) & (t_out < n_rows)
    else:
        t_out = t
        out_ok = pos_ok[:, None, None]
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]  # [1, H, 1]
    row_ok = pos_ok[:, None, None] & (heads < H)  # [P, H, 1]
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]  # [1, 1, HALF]
    col_ok = cols < half
    rot_mask = row_ok & col_ok
    row = x_ptr + b * x_sb + t * x_st + heads.to(tl.int64) * x_sh
    out_offset = b * y_sb + t_out * y_st + heads.to(tl.int64) * y_sh
    out_row = y_ptr + out_offset
    x1 = tl.load(row + cols, mask=rot_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    x2 = tl.load(row + half + cols, mask=rot_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if HAS_PASS:
        rest = tl.arange(0, BLOCK_PASS)[None, None, :]
        rest_mask = row_ok & (rest < D - 2 * half)
        xp = tl.load(row + 2 * half + rest, mask=rest_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if PASSENGER:
        features = tl.arange(0, BLOCK_D)[None, None, :]
        v_mask = row_ok & (features < D)
        v_row = v_ptr + b * v_sb + t * v_st + heads.to(tl.int64) * v_sh
        passenger = tl.load(v_row + features, mask=v_mask, other=0.0, eviction_policy="evict_first")
    table = b * cs_sb + t * cs_st + cols  # [P, 1, HALF]: read once per position, broadcast over heads
    table_mask = pos_ok[:, None, None] & col_ok
    cos1 = tl.load(cos_ptr + table, mask=table_mask, other=0.0)
    cos2 = tl.load(cos_ptr + half + table, mask=table_mask, other=0.0)
    sin1 = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
    sin2 = tl.load(sin_ptr + half + table, mask=table_mask, other=0.0)
    if NORM:
        # qk_norm's output: rms_norm rounds `normed` to x's dtype, then weight * normed. The weight
        # loads issue with the tile's, not after the reduction that waits on it.
        w1 = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_PASS:
            wp = tl.load(w_ptr + 2 * half + rest, mask=rest < D - 2 * half, other=0.0).to(tl.float32)
        norm_ty = x_ptr.dtype.element_ty
        out_ty = y_ptr.dtype.element_ty
        sum_sq = tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)
        if HAS_PASS:
            sum_sq += tl.sum(xp * xp, axis=2)
        rstd = tl.rsqrt(sum_sq / D + eps)[:, :, None]
        x1 = ((x1 * rstd).to(norm_ty).to(tl.float32) * w1).to(out_ty).to(tl.float32)
        x2 = ((x2 * rstd).to(norm_ty).to(tl.float32) * w2).to(out_ty).to(tl.float32)
        if HAS_PASS:
            xp = (xp * rstd).to(norm_ty).to(tl.float32) * wp
    store_mask = rot_mask & out_ok
    tl.store(out_row + cols, (x1 * cos1 + -x2 * sin1).to(y_ptr.dtype.element_ty), mask=store_mask,
             cache_modifier=".cs")
    tl.store(out_row + half + cols, (x2 * cos2 + x1 * sin2).to(y_ptr.dtype.element_ty), mask=store_mask,
             cache_modifier=".cs")
    if HAS_PASS:
        tl.store(out_row + 2 * half + rest, xp.to(y_ptr.dtype.element_ty), mask=rest_mask & out_ok,
                 cache_modifier=".cs")
    if PASSENGER:
        tl.store(vy_ptr + out_offset + features, passenger, mask=v_mask & out_ok, cache_modifier=".cs")


# Launch shape (tuned on an H100 and an H200 over rows 32..4096 of 32 heads x 128): values per
# program (a passenger's values included; qk_norm_rope's, without a passenger, NORM_TILE_VALUES: on
# an H200 it took 19.97 against 20.70 us at 4096 rows and 5.76 against 6.75 us at 1024 with 2048
# values, where rope alone is fastest with 4096, and the cache write with the norm showed no
# consistent winner; bench/results/tune-launch-rope-norm-h200.log), values per warp, programs per
# SM kept when growing tiles, and the fewest programs per SM for small grids.
TILE_VALUES = 4096
NORM_TILE_VALUES = 2048
VALUES_PER_WARP = 1024
PROGRAMS_PER_SM = 8
MIN_PROGRAMS_PER_SM = 2


def _check_destination(name: str, dest: torch.Tensor, batch: int, heads: int, head_dim: int, dtype) -> None:
    """dest: a [B, H, L, D] buffer (unit stride in D) the kernel writes rows of in place."""
    if not isinstance(dest, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(dest).__name__}")
    if dest.dim() != 4 or dest.shape[0] != batch or dest.shape[1] != heads or dest.shape[3] != head_dim:
        raise ValueError(f"{name} must be [B, H, L, D] = [{batch}, {heads}, L, {head_dim}], got {tuple(dest.shape)}")
    if dest.dtype != dtype:
        raise TypeError(f"{name} is {dest.dtype}, but the rows written into it are {dtype}")
    if head_dim > 1 and dest.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim")


def _plan_norm_rope(x, weight, cos, sin, out=None, rows=None, v=None, v_out=None) -> tuple:
    """Validate once per (shapes, strides, dtypes, device) and fix everything the launch needs.
    With `out`, rows t of the result go to out[:, :, rows[t]] ([B, H, L, D] buffer), and the
    passenger v [B, T, H, D] (if any) is copied unchanged to v_out[:, :, rows[t]] alongside."""
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != T:
            raise ValueError(f"{name} must be [B or 1, T, R] = [{B} or 1, {T}, R], got {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    R = cos.shape[-1]
    if R % 2 or R > D:
        raise ValueError(f"rotary dim R={R} must be even and at most head_dim D={D}")
    out_dtype = x.dtype
    if weight is not None:
        check_float("weight", weight)
        if weight.shape != (D,):
            raise ValueError(f"norm weight must be [D] = [{D}], got {tuple(weight.shape)}")
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is not None:
        _check_destination("out", out, B, H, D, out_dtype)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.shape[0] != T \
                or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be an int32/int64 tensor [T] = [{T}], got "
                             f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
    if v is not None:
        if out is None:
            raise ValueError("a passenger v needs an out buffer and rows")
        check_float("v", v)
        if v.shape != x.shape:
            raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
        _check_destination("v_out", v_out, B, H, D, v.dtype)
        if v_out.shape != out.shape or v_out.stride() != out.stride():
            raise ValueError("v_out must have out's shape and strides")
    check_same_device(x=x, cos=cos, sin=sin, weight=weight, out=out, rows=rows, v=v, v_out=v_out)
    check_runtime_device(x)
    if x.numel() == 0:
        return out_dtype, None
    x_copy = D > 1 and x.stride(-1) != 1
    x_strides = torch.empty_like(x, memory_format=torch.contiguous_format).stride() if x_copy else x.stride()
    v_copy = v is not None and D > 1 and v.stride(-1) != 1
    v_strides = (0, 0, 0) if v is None else (
        torch.empty_like(v, memory_format=torch.contiguous_format).stride() if v_copy else v.stride())
    rope_copy = R > 1 and (cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride())
    cos_strides = cos.contiguous().stride() if rope_copy else cos.stride()
    # [B, T, H, D] contiguous, or the buffer [B, H, L, D] addressed as (b, row, h)
    y_strides = (T * H * D, H * D, D) if out is None else (out.stride(0), out.stride(2), out.stride(1))
    block_half, block_pass = next_pow2(R // 2), next_pow2(D - R)
    # A passenger doubles the values a head row moves; counting it keeps rope_kv_write's programs
    # at TILE_VALUES (H200 sweep: 16 heads of k and v per program 35.5 us, 32 heads 36.4 us).
    streams = 2 if v is not None else 1
    tile_values = NORM_TILE_VALUES if weight is not None and v is None else TILE_VALUES
    block_h = min(next_pow2(H), max(1, tile_values // (streams * next_pow2(D))))
    # A step's few positions: split the heads until the grid fills the GPU.
    while block_h > 1 and B * T * cdiv(H, block_h) < MIN_PROGRAMS_PER_SM * sm_count(x.device):
        block_h //= 2
    head_tiles = cdiv(H, block_h)
    row_elements = block_h * (2 * block_half + (block_pass if R < D else 0)) * (2 if v is not None else 1)
    # Many positions: ~tile_values values per program in one tile while >= PROGRAMS_PER_SM programs
    # per SM remain, VALUES_PER_WARP values per warp: at 4096x32x128 bf16 a program of 4 warps takes
    # ~70 registers (ptxas), so 7 programs (56 KB of loads in flight) fit on an SM.
    block_pos = 1
    while block_pos * row_elements < tile_values \
            and cdiv(B * T, 2 * block_pos) * head_tiles >= PROGRAMS_PER_SM * sm_count(x.device):
        block_pos *= 2
    launch = dict(
        x_copy=x_copy, v_copy=v_copy, rope_copy=rope_copy,
        weight_copy=weight is not None and not weight.is_contiguous(),
        grid=(cdiv(B * T, block_pos), head_tiles), x_strides=x_strides[:3], v_strides=v_strides[:3],
        rope_strides=(cos_strides[0] if cos.shape[0] > 1 else 0, cos_strides[1]),
        y_strides=y_strides, n_rows=out.shape[2] if out is not None else T,
        sizes=(T, H, D, R // 2), n_pos=B * T,
        constants=dict(NORM=weight is not None, HAS_PASS=R < D, ROWS=out is not None, PASSENGER=v is not None,
                       BLOCK_POS=block_pos, BLOCK_H=block_h,
                       BLOCK_HALF=block_half, BLOCK_PASS=block_pass, BLOCK_D=next_pow2(D),
                       num_warps=max(1, min(8, block_pos * row_elements // VALUES_PER_WARP)),
                       **early_launch_options(x.device)),
    )
    return out_dtype, launch


_PLANS = PlanCache()


def launch_norm_rope(x, weight, eps, cos, sin, out=None, rows=None, v=None, v_out=None) -> torch.Tensor:
    """x [B, T, H, D]; weight [D] or None (no norm); cos, sin [B or 1, T, R] fp32. Returns a new
    [B, T, H, D] tensor, or with out/rows (and the passenger v/v_out) writes the [B, H, L, D]
    buffers in place at rows and returns out."""
    tensors = (x, weight, cos, sin, out, rows, v, v_out)
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors) or x is None or cos is None or sin is None:
        return _plan_norm_rope(*tensors)  # raises the type error
    key = tuple(tensor_key(t) for t in tensors)
    out_dtype, plan = _PLANS.get(key, lambda: _plan_norm_rope(*tensors))
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device) if out is None else out
    if plan is None:
        return y
    if plan["x_copy"]:
        x = x.contiguous()
    if plan["v_copy"]:
        v = v.contiguous()
    if plan["rope_copy"]:
        cos, sin = cos.contiguous(), sin.contiguous()
    if weight is not None and plan["weight_copy"]:
        weight = weight.contiguous()
    _norm_rope_kernel[plan["grid"]](
        x, *plan["x_strides"],
        weight if weight is not None else x,
        cos, sin, *plan["rope_strides"],
        y, *plan["y_strides"],
        rows if rows is not None else x, plan["n_rows"],
        v if v is not None else x, *plan["v_strides"], v_out if v_out is not None else y,
        *plan["sizes"], float(eps), plan["n_pos"],
        **plan["constants"],
    )
    return y


def fused_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton apply_rope: x [B, T, H, D] (any strides), cos/sin [B or 1, T, R] fp32."""
    return launch_norm_rope(x, None, 0.0, cos, sin)


def rope_bytes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    return 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()


# ---------------------------------------------------------------------------------------------
# Pattern: rope, the recorded rotate-half form of apply_rope:
#   x_rot = x32[..., :R] (alias when R = D), x_pass = x32[..., R:]; x1, x2 = split(x_rot, R/2)
#   out = cat(x_rot * cos[:, :, None] + cat(-x2, x1) * sin[:, :, None], x_pass), cast to x.dtype
# with multiplies and the add in either operand order and the casts absent for fp32 x.

from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import CAST, Walker, last_dim, no_overlap  # noqa: E402

_END = 2**63 - 1


def _slice_of(walker: Walker, value: str):
    """(source, start, end) when `value` is a last-dim, unit-step slice; alias counts as the full slice."""
    node = walker.node(value)
    if node is None:
        return None
    if node.op == "aten.alias.default":
        return node.inputs[0], 0, _END
    if node.op != "aten.slice.Tensor" or len(node.inputs) != 1:
        return None
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    _, dim, start, end, step = args[:5]
    if step != 1 or not last_dim(dim, len(walker.shape(node.inputs[0]))):
        return None
    return node.inputs[0], start or 0, _END if end is None else end


def _unsqueezed_table(walker: Walker, value) -> str | None:
    """cos/sin [B or 1, T, R] fp32 behind `table[:, :, None, :]`."""
    name = getattr(value, "name", None)
    node = walker.node(name) if name else None
    if node is None or node.op != "aten.unsqueeze.default" or node.args[1] != 2:
        return None
    table = node.inputs[0]
    if len(walker.shape(table)) != 3 or walker.dtype(table) != torch.float32 or len(walker.users(name)) != 1:
        return None
    walker.take(name, "aten.unsqueeze.default")
    return table


def match_rope_at(walker: Walker, anchor: int) -> dict | None:
    """Match apply_rope around the neg node `anchor`. Returns x (pre-cast input), cos, sin, out."""
    g = walker.graph
    neg = g.nodes[anchor]
    if neg.op != "aten.neg.default":
        return None
    walker.taken.append(anchor)
    split = walker.take(neg.inputs[0], "aten.split.Tensor")
    if split is None or len(split.outputs) != 2 or split.outputs[1] != neg.inputs[0]:
        return None
    x1, x_rot = split.outputs[0], split.inputs[0]
    rot_shape = walker.shape(x_rot)
    if len(rot_shape) != 4 or rot_shape[-1] != 2 * split.args[1] or not last_dim(
            split.args[2] if len(split.args) > 2 else 0, 4):
        return None
    rotated = walker.sole_user(neg.outputs[0], "aten.cat.default")
    if rotated is None or [getattr(r, "name", None) for r in rotated[1].args[0]] != [neg.outputs[0], x1] \
            or not last_dim(rotated[1].args[1] if len(rotated[1].args) > 1 else 0, 4):
        return None
    walker.taken.append(rotated[0])
    sliced = _slice_of(walker, x_rot)
    if sliced is not None and sliced[1] == 0:
        x32, R = sliced[0], rot_shape[-1]
        walker.take(x_rot, ("aten.alias.default", "aten.slice.Tensor"))
    else:
        x32, R = x_rot, rot_shape[-1]
    # x_rot * cos and rotated * sin, added
    rot_users = [i for i in walker.users(x_rot) if g.nodes[i].op == "aten.mul.Tensor"]
    sin_user = walker.sole_user(rotated[1].outputs[0], "aten.mul.Tensor")
    if len(rot_users) != 1 or sin_user is None:
        return None
    cos = _unsqueezed_table(walker, walker.other_operand(g.nodes[rot_users[0]], x_rot))
    sin = _unsqueezed_table(walker, walker.other_operand(sin_user[1], rotated[1].outputs[0]))
    if cos is None or sin is None or walker.shape(cos)[-1] != R or walker.shape(sin) != walker.shape(cos):
        return None
    walker.taken += [rot_users[0], sin_user[0]]
    cos_term, sin_term = g.nodes[rot_users[0]].outputs[0], sin_user[1].outputs[0]
    add = walker.sole_user(cos_term, "aten.add.Tensor")
    if add is None or getattr(walker.other_operand(add[1], cos_term), "name", None) != sin_term:
        return None
    walker.taken.append(add[0])
    out = add[1].outputs[0]
    D = walker.shape(x32)[-1]
    if R != D or walker.sole_user(out, "aten.cat.default"):
        joined = walker.sole_user(out, "aten.cat.default")
        if joined is None:
            return None
        parts = [getattr(r, "name", None) for r in joined[1].args[0]]
        tail = _slice_of(walker, parts[1]) if len(parts) == 2 and parts[0] == out and parts[1] else None
        if tail is None or tail[0] != x32 or tail[1] != R or tail[2] < D:
            return None
        walker.take(parts[1], "aten.slice.Tensor")
        walker.taken.append(joined[0])
        out = joined[1].outputs[0]
    x = walker.uncast(x32, torch.float32)
    if walker.dtype(x) != torch.float32:
        cast = walker.sole_user(out, CAST)
        if cast is None or cast[1].kwargs.get("dtype") != walker.dtype(x):
            return None
        walker.taken.append(cast[0])
        out = cast[1].outputs[0]
    return {"x": x, "cos": cos, "sin": sin, "out": out}


def rope_anchors(graph) -> list[int]:
    return [i for i, n in enumerate(graph.nodes) if n.op == "aten.neg.default"]


class RoPEPattern(Pattern):
    name = "rope"
    priority = 10

    def match(self, graph):
        matches = []
        for anchor in rope_anchors(graph):
            walker = Walker(graph)
            found = match_rope_at(walker, anchor)
            if found and walker.closed([found["out"]]):
                matches.append(walker.match(self.name, (found["x"], found["cos"], found["sin"]), (found["out"],)))
        return no_overlap(matches)

    def reference(self, x, cos, sin):
        return apply_rope(x, cos, sin)

    def kernel(self, x, cos, sin):
        return fused_apply_rope(x, cos, sin)

    def bytes_moved(self, x, cos, sin):
        return rope_bytes(x, cos, sin)


register(RoPEPattern())
