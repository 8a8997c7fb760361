"""Routed SwiGLU experts: out[n] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]), where
expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)).

Shapes: N tokens, H hidden, E experts, K experts per token, I expert inner size, S = N * K
token-expert slots. x [N, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; weights
[N, K] (any float dtype, used in fp32); ids [N, K] integer. A slot whose id is outside [0, E)
contributes nothing: with experts sharded over ranks (expert parallelism) each rank passes
global ids minus its first expert and sums the partial outputs.

Numerics, shared by the references and the kernel: GEMMs accumulate in fp32; the gate-up and
expert outputs are rounded to x.dtype as a plain PyTorch expert would; the weighted sum over the
K slots is accumulated in fp32 and rounded once at the end.

Three implementations of the same sum:
- moe_sorted_reference: slots grouped by expert, one GEMM pair per expert that received tokens.
  Only the needed work, but it reads per-expert counts on the host (not CUDA-graph capturable).
- moe_dense_reference: every expert on every token, weighted (0 when not chosen). Sync-free,
  static shapes, E / K times the FLOPs.
- fused_moe: Triton grouped GEMMs over slots sorted by expert (below). Sync-free, static shapes.
"""

import torch
import torch.nn.functional as F

from difuse.patterns.swiglu import swiglu_fused


def _local_slots(weights: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Flat ids with every id outside [0, E) replaced by E, and fp32 flat weights."""
    ids = ids.reshape(-1)
    outside = (ids < 0) | (ids >= num_experts)
    return ids.masked_fill(outside, num_experts), weights.reshape(-1).float()


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(swiglu_fused(F.linear(x, w13)), w2)


def moe_sorted_reference(x, w13, w2, weights, ids):
    N, K = ids.shape
    E = w13.shape[0]
    flat_ids, slot_weights = _local_slots(weights, ids, E)
    order = flat_ids.argsort(stable=True)  # slot indices grouped by expert
    counts = torch.bincount(flat_ids, minlength=E + 1).tolist()  # host sync
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts[:E]):
        if count:
            slots = order[start:start + count]
            tokens = slots // K
            out.index_add_(0, tokens, _expert(x[tokens], w13[expert], w2[expert]).float() * slot_weights[slots, None])
        start += count
    return out.to(x.dtype)


def moe_dense_reference(x, w13, w2, weights, ids):
    N, K = ids.shape
    E = w13.shape[0]
    flat_ids, slot_weights = _local_slots(weights, ids, E)
    flat_ids, slot_weights = flat_ids.view(N, K), slot_weights.view(N, K)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(E):
        token_weight = (slot_weights * (flat_ids == expert)).sum(dim=-1)  # [N], 0 where not routed here
        out += _expert(x, w13[expert], w2[expert]).float() * token_weight[:, None]
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused kernels. Slots are sorted by expert and each expert's run is padded to a multiple of
# BLOCK_M (a counting sort), so a block of BLOCK_M sorted rows belongs to one expert.
# Two grouped GEMMs, one program per (row block, column block):
#   1. gate_up: act[row] = swiglu(x[token(row)] @ w13[e].T)       [P, I] in x.dtype
#   2. down:    slot_out[slot(row)] = weight(slot) * (act[row] @ w2[e].T)   [S, H] in fp32
# then a combine kernel sums each token's K slot rows in k order: results are deterministic
# (no atomics). Every size is a function of (N, K, E, BLOCK_M) alone: the padded row count is
# bounded by S + min(E, S) * (BLOCK_M - 1), and the blocks past the real padded count exit at
# once. No host sync anywhere, so the whole op can be captured in a CUDA graph.

import difuse.fusion  # noqa: E402,F401  (selects the Triton interpreter on CPU-only hosts before triton loads)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from difuse.patterns._rows import interpreter_widens_dot  # noqa: E402

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def padded_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the sorted, per-expert padded row count, a multiple of block_m."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def align_by_expert_reference(ids: torch.Tensor, num_experts: int, block_m: int):
    """PyTorch form of align_by_expert (same outputs): a stable argsort by expert, some twenty
    small kernels."""
    flat = ids.reshape(-1)
    S = flat.numel()
    flat = flat.masked_fill((flat < 0) | (flat >= num_experts), num_experts).long()  # E: not here
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts[num_experts:].zero_()  # foreign slots get no rows
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_ids = flat[order]
    rank = torch.arange(S, device=ids.device) - (counts.cumsum(0) - counts)[sorted_ids]  # within its expert
    dest = (padded_end - padded)[sorted_ids] + rank
    capacity = padded_capacity(S, num_experts, block_m)
    dest = torch.where(sorted_ids < num_experts, dest, capacity)  # foreign slots go to a spill row
    sorted_slots = torch.full((capacity + 1,), S, dtype=torch.int32, device=ids.device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=ids.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_slots[:capacity], block_expert


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [N, K] -> (sorted_slots int32 [P], block_expert int32 [P / block_m]).

    sorted_slots lists the slot indices (n * K + k) grouped by expert, in slot order within an
    expert, each expert's run padded to a multiple of block_m with the sentinel S; block_expert[b]
    is the expert of row block b, or -1 for blocks past the end. Slots whose id is outside [0, E)
    get no row. Two kernels, sync-free (a counting sort, below)."""
    flat = ids.reshape(-1)
    S = flat.numel()
    capacity = padded_capacity(S, num_experts, block_m)
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    sorted_slots = torch.empty(capacity, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=ids.device)
    chunk = min(ALIGN_CHUNK, triton.next_power_of_2(max(S, 1)))
    _count_kernel[(num_experts,)](flat, S, counts, CHUNK=chunk, num_warps=ALIGN_WARPS)
    _place_kernel[(num_experts,)](
        flat, S, counts, num_experts, capacity, sorted_slots, block_expert,
        BLOCK_M=block_m, PAD_ROWS=triton.next_power_of_2(block_m), BLOCK_E=triton.next_power_of_2(num_experts),
        CHUNK=chunk, num_warps=ALIGN_WARPS,
    )
    return sorted_slots, block_expert


# Counting sort, one program per expert, in two launches (every program needs every expert's
# count before it can place a slot): count the expert's slots; then pad the counts to block_m,
# take their running sum for the expert's first row, and place its slots there in slot order
# (the rank of a slot is a running sum over the slots that chose this expert), the same order
# as a stable sort by expert. It replaces some twenty small PyTorch kernels (argsort, scatters,
# cumsums, searchsorted): 3.9 against 83.2 us at 256 slots, 22.7 against 140.6 us at 16384 on an
# H200 (bench/results/moe-align-tiles-h200.log).
ALIGN_CHUNK = 1024  # slots per step of a program's loop
ALIGN_WARPS = 4


@triton.jit
def _count_kernel(ids_ptr, num_slots, counts_ptr, CHUNK: tl.constexpr):
    expert = tl.program_id(0)
    count = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        count += (tl.load(ids_ptr + slot, mask=slot < num_slots, other=-1) == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(count, axis=0))


@triton.jit
def _place_kernel(
    ids_ptr, num_slots, counts_ptr, num_experts, capacity,
    sorted_slots_ptr,  # int32 [capacity]
    block_expert_ptr,  # int32 [capacity / BLOCK_M]
    BLOCK_M: tl.constexpr,
    PAD_ROWS: tl.constexpr,  # a power of two >= BLOCK_M
    BLOCK_E: tl.constexpr,  # a power of two >= num_experts
    CHUNK: tl.constexpr,
):
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    mine = experts == expert
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    start = end - tl.sum(tl.where(mine, padded, 0), axis=0)
    count = tl.sum(tl.where(mine, counts, 0), axis=0)
    placed = start
    for first in range(0, num_slots, CHUNK):
        slot = first + tl.arange(0, CHUNK)
        hit = tl.load(ids_ptr + slot, mask=slot < num_slots, other=-1) == expert
        row = placed + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(sorted_slots_ptr + row, slot.to(tl.int32), mask=hit)
        placed += tl.sum(hit.to(tl.int32), axis=0)
    pad = start + count + tl.arange(0, PAD_ROWS)  # fewer than BLOCK_M rows
    tl.store(sorted_slots_ptr + pad, tl.full([PAD_ROWS], 0, tl.int32) + num_slots, mask=pad < end)
    for block in range(start // BLOCK_M, end // BLOCK_M, CHUNK):
        blocks = block + tl.arange(0, CHUNK)
        tl.store(block_expert_ptr + blocks, tl.full([CHUNK], 0, tl.int32) + expert, mask=blocks < end // BLOCK_M)
    if expert == 0:  # the rows and blocks past every expert's
        total = tl.sum(padded, axis=0)
        for row in range(total, capacity, CHUNK):
            rows = row + tl.arange(0, CHUNK)
            tl.store(sorted_slots_ptr + rows, tl.full([CHUNK], 0, tl.int32) + num_slots, mask=rows < capacity)
        for block in range(total // BLOCK_M, capacity // BLOCK_M, CHUNK):
            blocks = block + tl.arange(0, CHUNK)
            tl.store(block_expert_ptr + blocks, tl.full([CHUNK], -1, tl.int32), mask=blocks < capacity // BLOCK_M)


@triton.jit
def _gate_up_kernel(
    x_ptr, stride_xn, stride_xh,  # [N, H]
    w_ptr, stride_we, stride_wn, stride_wh,  # w13 [E, 2I, H]
    act_ptr,  # contiguous [P, I], x dtype
    slots_ptr, block_expert_ptr,
    H, I, top_k, num_slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + rows)
    valid = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xn + kk[None, :] * stride_xh,
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_expert + cols[None, :] * stride_wn + kk[:, None] * stride_wh, mask=w_mask, other=0.0)
        w_up = tl.load(w_expert + (cols + I)[None, :] * stride_wn + kk[:, None] * stride_wh, mask=w_mask, other=0.0)
        if WIDEN:
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        gate = tl.dot(a, w_gate, gate, input_precision=PRECISION)
        up = tl.dot(a, w_up, up, input_precision=PRECISION)
    out_ty = act_ptr.dtype.element_ty
    gate = gate.to(out_ty).to(tl.float32)
    up = up.to(out_ty).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32) * up
    tl.store(act_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], act.to(out_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # contiguous [P, I]
    w_ptr, stride_we, stride_wn, stride_wk,  # w2 [E, H, I]
    out_ptr,  # contiguous fp32 [S, H], zero-filled
    slots_ptr, block_expert_ptr, slot_weight_ptr,  # slot_weight fp32 [S]
    H, I, num_slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + rows)
    valid = slots < num_slots
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < I
        a = tl.load(act_ptr + rows[:, None].to(tl.int64) * I + kk[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_expert + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if WIDEN:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    weight = tl.load(slot_weight_ptr + slots, mask=valid, other=0.0)
    y = acc.to(act_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + slots[:, None].to(tl.int64) * H + cols[None, :], y, mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    slot_out_ptr,  # fp32 [S, H]; rows of slots routed outside [0, E) are never written
    ids_ptr,  # [S]
    out_ptr,  # [N, H]
    H, num_experts,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[n] = sum over k of slot_out[n * K + k], in k order, fp32, rounded once."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = n * TOP_K + k
        expert = tl.load(ids_ptr + slot + tl.zeros([BLOCK_H], dtype=tl.int32))  # the slot's expert, in every lane
        routed = col_ok & (expert >= 0) & (expert < num_experts)
        total += tl.load(slot_out_ptr + slot * H + cols, mask=routed, other=0.0)
    tl.store(out_ptr + n * H + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


COMBINE_COLUMNS = 1024


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))  # tl.dot wants every dim >= 16


# Launch shape of the grouped GEMMs, by how many token-expert slots there are. Up to FEW_SLOTS
# (decode-sized blocks) they stream expert weights: small row blocks keep padding low. Swept on
# an H200 at LLaDA-MoE's experts (hidden 2048, inner 1024, 64 experts, top 8), bf16, 4 warps: at
# 32 tokens K tiles of 128 over 2 stages took gate_up from 134.7 to 124.6 us and down from 69.7
# to 67.1 us; at 512 tokens 128-column tiles took down from 103.5 to 97.0 us
# (bench/results/moe-align-tiles-h200.log). `python -m bench.tune_launch moe` sweeps them.
FEW_SLOTS = 1024
BLOCK_M_FEW, BLOCK_N_FEW, BLOCK_K_FEW, STAGES_FEW = 16, 64, 128, 2
BLOCK_M_MANY, GATE_UP_BLOCK_N_MANY, DOWN_BLOCK_N_MANY, BLOCK_K_MANY, STAGES_MANY = 64, 64, 128, 64, 3


def moe_block_m(num_slots: int) -> int:
    """Rows per program of the grouped GEMMs."""
    return BLOCK_M_FEW if num_slots <= FEW_SLOTS else BLOCK_M_MANY


def _gemm_tiles(num_slots: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_K, stages) of the gate_up and of the down kernel."""
    if num_slots <= FEW_SLOTS:
        return (BLOCK_N_FEW, BLOCK_K_FEW, STAGES_FEW), (BLOCK_N_FEW, BLOCK_K_FEW, STAGES_FEW)
    return (GATE_UP_BLOCK_N_MANY, BLOCK_K_MANY, STAGES_MANY), (DOWN_BLOCK_N_MANY, BLOCK_K_MANY, STAGES_MANY)


def _check(x, w13, w2, weights, ids):
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"x {x.dtype}, w13 {w13.dtype} and w2 {w2.dtype} must share one dtype")
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or ids.dim() != 2:
        raise ValueError(f"expected x [N, H], w13 [E, 2I, H], w2 [E, H, I], ids [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}, {tuple(ids.shape)}")
    (N, H), (E, two_i, _) = x.shape, w13.shape
    if w13.shape[2] != H or two_i % 2 or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}: "
                         f"want w13 [E, 2I, {H}] and w2 [E, {H}, I]")
    if ids.shape[0] != N or weights.shape != ids.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and ids {tuple(ids.shape)} must both be [N={N}, K]")
    devices = {t.device for t in (x, w13, w2, weights, ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              block_m: int | None = None) -> torch.Tensor:
    """Triton routed experts; same result as moe_sorted_reference. x [N, H] -> [N, H] in x.dtype.

    Runs as the custom op difuse::fused_moe, so a dispatch-level recorder (and torch.compile)
    sees one op with a shape function instead of kernel launches it cannot follow."""
    _check(x, w13, w2, weights, ids)
    return torch.ops.difuse.fused_moe(x, w13, w2, weights, ids, block_m or moe_block_m(ids.numel()))


@torch.library.custom_op("difuse::fused_moe", mutates_args=())
def _fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  block_m: int) -> torch.Tensor:
    N, H = x.shape
    E, I, K = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    S = N * K
    if S == 0:
        return torch.zeros_like(x)
    sorted_slots, block_expert = align_by_expert(ids, E, block_m)
    P = sorted_slots.numel()
    widen = interpreter_widens_dot(x.dtype)
    precision = "ieee" if x.dtype == torch.float32 or widen else "tf32"  # fp32 GEMMs stay fp32, as in the reference
    slot_weights = weights.reshape(-1).float()

    act = torch.empty(P, I, dtype=x.dtype, device=x.device)
    gate_up_tiles, down_tiles = _gemm_tiles(S)
    block_n, block_k, stages = gate_up_tiles
    block_n, block_k = _block(I, block_n), _block(H, block_k)
    _gate_up_kernel[(P // block_m, triton.cdiv(I, block_n))](
        x, x.stride(0), x.stride(1), w13, w13.stride(0), w13.stride(1), w13.stride(2),
        act, sorted_slots, block_expert, H, I, K, S,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, WIDEN=widen, num_warps=4,
        num_stages=stages,
    )
    slot_out = torch.empty(S, H, dtype=torch.float32, device=x.device)  # routed rows only: the sum masks the rest
    block_n, block_k, stages = down_tiles
    block_n, block_k = _block(H, block_n), _block(I, block_k)
    _down_kernel[(P // block_m, triton.cdiv(H, block_n))](
        act, w2, w2.stride(0), w2.stride(1), w2.stride(2),
        slot_out, sorted_slots, block_expert, slot_weights, H, I, S,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, WIDEN=widen, num_warps=4,
        num_stages=stages,
    )
    out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    block_h = min(COMBINE_COLUMNS, triton.next_power_of_2(H))
    _combine_kernel[(N, triton.cdiv(H, block_h))](
        slot_out, ids.reshape(-1), out, H, E, TOP_K=K, BLOCK_H=block_h, num_warps=4,
    )
    return out


@_fused_moe_op.register_fake
def _(x, w13, w2, weights, ids, block_m):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def moe_bytes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> int:
    """Fewest bytes a routed-expert op must move: the weights of the distinct experts actually
    routed to, the activations in and out, and the routing weights and ids (host-side count,
    for reports and benchmarks, not on the hot path)."""
    E = w13.shape[0]
    flat = ids.reshape(-1)
    used = torch.unique(flat[(flat >= 0) & (flat < E)]).numel()
    per_expert = w13[0].numel() * w13.element_size() + w2[0].numel() * w2.element_size()
    activations = 2 * x.numel() * x.element_size()
    routing = weights.numel() * weights.element_size() + ids.numel() * ids.element_size()
    return used * per_expert + activations + routing
