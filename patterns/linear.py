"""Linear layer over few rows: y = x @ weight.T, x [M, K], weight [N, K], M small (a denoise
step's block of 32 tokens at batch 1).

There the matmul is bound by streaming the weight from HBM once: 32 x 4096 x 4096 in bf16 is 1 GFLOP
but 32 MB. cuBLAS picks tiles for compute-bound shapes and at LLaDA-8B's attention output
projection reaches only ~72% of copy bandwidth on an H100 (59% on an H200); this kernel is built
to stream.
"""
import torch


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, weight.t())


# ---------------------------------------------------------------------------------------------
# Fused kernel. Swapped operands: a program computes the transposed tile y.T[BLOCK_N, BLOCK_M] =
# weight[BLOCK_N, K] @ x.T, so the weight rows fill the tensor-core tile's long side and the few
# token rows its short side (Hopper's wgmma is 64 rows by 8..256 columns). Each program streams its
# weight rows over one of SPLIT_K slices of K, pipelined NUM_STAGES deep, so the grid fills every
# SM with enough loads in flight. With SPLIT_K > 1 each program stores its fp32 partial tile and
# bumps the tile's arrival count; the last to arrive reads back all partials and sums them in split
# order (the result does not depend on arrival order), writes y and zeroes the count for the next
# launch, so a launch is one kernel and replays in a CUDA graph.
#
# Tried and not kept: SwiGLU in the epilogue of the gate_up projection (each program streaming its
# gate rows and their up rows). At LLaDA-8B's gate_up, 32 rows, H200, it took 50.8 us tuned, against
# 51.5 us for this kernel plus the SwiGLU kernel, yet made the batch-1 step 2% slower (4.772 against
# 4.676 ms; bench/results/ab-llada-8b-b1-linear-swiglu-h200.log). Nor loading the first weight tile
# before waiting for the kernel launched before (PDL), the K loop's first iteration peeled: the
# step was 6% slower (4.999 against 4.714 ms, H200; ab-llada-8b-b1-linear-preload-h200.log). Nor
# 32- or 16-row weight tiles, for fewer or no splits of K at the attention-output and FFN-down
# projections: alone they took 12.63-16.91 against 13.13 us and 30.17-45.22 against 29.07 us, and
# the step was 2.6% slower (4.789 and 4.792 against 4.665 ms; linear-narrow-tiles-h200.log). Nor
# Add+RMSNorm as a prologue on the x tiles (the residual added, squares summed, norm weight applied
# before the dot, 1/rms on the output rows): math on x between its load and the dot took QKV from
# 27.3 to 41.1 us, and with the residual add and its store to 54.2 us (norm-linear-prologue-h200.log).

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from difuse.patterns._rows import (  # noqa: E402
    PlanCache,
    cdiv,
    check_float,
    check_runtime_device,
    check_same_device,
    early_launch_options,
    interpreter_widens_dot,
    is_nvidia_hopper_or_newer,
    next_pow2,
    sm_count,
    split_workspace,
    tensor_key,
    wait_for_previous_kernel,
)


@triton.jit
def _linear_kernel(
    x_ptr, x_sm, x_sk,  # [M, K]
    w_ptr, w_sn, w_sk,  # [N, K]
    y_ptr, y_sm,  # [M, N], unit stride in N
    part_ptr,  # fp32 [SPLIT_K, M, N] partial tiles (used when SPLIT_K > 1)
    count_ptr,  # int32 [tiles] arrivals per output tile, zero between launches
    M, N, K, k_split, split_size,  # k_split: K values per split, a multiple of BLOCK_K; split_size = M * N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K == SPLIT_K * k_split: no K mask
    NUM_STAGES: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 operands (as torch.mm), "tf32" otherwise (unused for 16-bit)
    WIDEN: tl.constexpr,  # bf16 operands widened to fp32 (interpreter_widens_dot)
    PDL: tl.constexpr,  # launched early (early_launch_options)
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * k_split + tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    wait_for_previous_kernel(PDL)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * w_sn + rk[None, :] * w_sk
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * x_sm + rk[None, :] * x_sk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in tl.range(0, k_split, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            k_ok = (rk + k < K)[None, :]
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        if WIDEN:
            w, x = w.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K * w_sk
        x_ptrs += BLOCK_K * x_sk
    tile = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    out_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * y_sm + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, tile.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(part_ptr + pid_k * split_size + part_offsets, tile, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is published
        counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * split_size + part_offsets, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)


# Launch shape, from bench.tune_launch linear on an H200 at LLaDA-8B's projections (32 rows):
# weight rows per program, K per pipeline stage and stages in flight (3 stages leave shared memory
# for three programs per SM, which streamed faster than one program 5 deep); splits of K are added
# until the grid has at least SPLITS_UNTIL_PROGRAMS programs per SM.
BLOCK_N = 64
BLOCK_K = 128
NUM_STAGES = 3
NUM_WARPS = 4
SPLITS_UNTIL_PROGRAMS = 1.0
MAX_SPLIT_K = 8
# The most rows the kernel takes. On an H200 it beat cuBLAS by 3-6% at 32 rows and 3-12% at 16, was
# 1-15% behind at 64 on three of four projections and 10-50% behind at 128, so the pattern replaces
# a matmul only up to STREAMING_ROWS rows, and only one that streams a weight of at least
# STREAMING_WEIGHT_BYTES (smaller ones were not measured).
MAX_ROWS = 128
STREAMING_ROWS = 32
STREAMING_WEIGHT_BYTES = 16 << 20


def _plan_linear(x: torch.Tensor, weight: torch.Tensor) -> dict:
    M, K = x.shape
    N = weight.shape[0]
    block_m = max(16, next_pow2(M))
    block_k = min(BLOCK_K, max(16, next_pow2(K)))
    n_tiles, m_tiles = cdiv(N, BLOCK_N), cdiv(M, block_m)
    k_blocks = cdiv(K, block_k)
    split_k = 1
    while (split_k < MAX_SPLIT_K and 2 * split_k <= k_blocks
           and n_tiles * m_tiles * split_k < SPLITS_UNTIL_PROGRAMS * sm_count(x.device)):
        split_k *= 2
    k_split = cdiv(k_blocks, split_k) * block_k
    split_k = cdiv(K, k_split)  # no empty split
    widen = interpreter_widens_dot(x.dtype)
    return dict(
        grid=(n_tiles, split_k, m_tiles), sizes=(M, N, K, k_split, M * N),
        workspace=_workspace(x.device, split_k, M, N, n_tiles * m_tiles) if split_k > 1 else None,
        x_copy=x.stride(-1) != 1 and K > 1, w_copy=weight.stride(-1) != 1 and K > 1,
        constants=dict(BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, SPLIT_K=split_k,
                       EVEN_K=split_k * k_split == K, NUM_STAGES=NUM_STAGES,
                       PRECISION="ieee" if x.dtype == torch.float32 or widen else "tf32", WIDEN=widen,
                       num_warps=NUM_WARPS, **early_launch_options(x.device)),
    )


_PLANS = PlanCache()


def _workspace(device: torch.device, split_k: int, M: int, N: int, tiles: int) -> tuple:
    """Split-K partials and the output tiles' arrival counts."""
    return split_workspace(("linear", device, split_k, M, N, tiles), lambda: (
        torch.empty(split_k, M, N, dtype=torch.float32, device=device),
        torch.zeros(tiles, dtype=torch.int32, device=device)))


def fused_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton x @ weight.T for x [M, K] with few rows (M <= MAX_ROWS) and weight [N, K] of x's
    dtype, any strides; fp32 accumulation, the result [M, N] in that dtype. Launches of one shape
    share a split-K workspace: run them on one stream."""
    check_float("x", x)
    check_float("weight", weight)
    check_same_device(x=x, weight=weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"fused_linear streams the weight for at most {MAX_ROWS} rows, got {x.shape[0]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have one dtype")
    check_runtime_device(x)
    M, N = x.shape[0], weight.shape[0]
    if M == 0 or N == 0 or x.shape[1] == 0:
        return torch.zeros(M, N, dtype=x.dtype, device=x.device)
    plan = _PLANS.get((tensor_key(x), tensor_key(weight)), lambda: _plan_linear(x, weight))
    if plan["x_copy"]:
        x = x.contiguous()
    if plan["w_copy"]:
        weight = weight.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part, counts = plan["workspace"] or (y, y)
    _linear_kernel[plan["grid"]](
        x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1), y, y.stride(0),
        part, counts, *plan["sizes"], **plan["constants"],
    )
    return y


def linear_bytes(x: torch.Tensor, weight: torch.Tensor) -> int:
    return (x.numel() + weight.numel() + x.shape[0] * weight.shape[0]) * x.element_size()


# ---------------------------------------------------------------------------------------------
# Pattern: linear, a matmul of few rows by a transposed 16-bit weight, as nn.Linear records it:
#   w_t = t(weight); y = mm(x, w_t)

from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import Walker  # noqa: E402


def _measured_on(device: str) -> bool:
    """The kernel was tuned and found faster than cuBLAS on an H200; the H100, the same sm_90
    architecture, takes it too (not yet measured there). Other GPUs keep cuBLAS. CPU means the
    Triton interpreter, where the tests run it."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return is_nvidia_hopper_or_newer(device) and torch.cuda.get_device_capability(device)[0] == 9


# The profile rule keeps the kernel unless, timed alone, it is PROFILE_RATIO x cuBLAS or slower. It
# moves cuBLAS's bytes, so it is not held to fusion_ratio; and launched early in the step it hides
# its launch and first loads behind the kernel before it, which a kernel timed alone cannot show.
# At LLaDA-8B batch 1 (H200) the step took 4.618 ms with every projection on this kernel and
# 4.871 ms with all on cuBLAS, while timed alone the kernel ranged from 2% slower to 5% faster, so
# a bar below 1 turned projections down on noise (ab-llada-8b-b1-linear-profile-ratio-h200.log).
PROFILE_RATIO = 1.05


class LinearPattern(Pattern):
    name = "linear"
    priority = 0

    @property
    def profile_ratio(self) -> float:
        return PROFILE_RATIO  # read when deciding, so that a run can set the module constant

    def match(self, graph):
        matches = []
        for i, node in enumerate(graph.nodes):
            if node.op != "aten.mm.default" or len(node.inputs) != 2:
                continue
            walker = Walker(graph)
            walker.taken.append(i)
            x, w_t = node.inputs
            transpose = walker.take(w_t, "aten.t.default")
            if transpose is None or x == w_t:
                continue
            weight = transpose.inputs[0]
            rows, meta = walker.shape(x)[0], graph.meta[weight]
            if rows > STREAMING_ROWS or meta.dtype not in (torch.float16, torch.bfloat16) \
                    or walker.dtype(x) != meta.dtype or meta.nbytes < STREAMING_WEIGHT_BYTES \
                    or not _measured_on(meta.device):
                continue
            if walker.closed(node.outputs):
                matches.append(walker.match(self.name, (x, weight), node.outputs))
        return matches

    def reference(self, x, weight):
        return linear(x, weight)

    def kernel(self, x, weight):
        return fused_linear(x, weight)

    def bytes_moved(self, x, weight):
        return linear_bytes(x, weight)


register(LinearPattern())
