"""Decoder confidence selection, the inner loop of every dLLM sampler.

token_confidence: logits [..., V] -> (confidence fp32 [...], token int64 [...]). The token is the
argmax of the logits (at temperature > 0, of the Gumbel-perturbed logits, drawn as the
exponential race logits / T - log(E), E ~ Exp(1)); the confidence is softmax(logits) at that token.

threshold_select / topk_select: choose which still-masked positions of a block to commit and write
their tokens into the block in place. Decisions stay on the device: no host sync.
"""
import torch


def token_confidence(logits: torch.Tensor, temperature: float = 0.0):
    logits32 = logits.float()
    probs = torch.softmax(logits32, dim=-1)
    if temperature > 0:
        noise = torch.empty_like(logits32).exponential_()
        token = (logits32 / temperature - noise.log()).argmax(dim=-1)
        confidence = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, token = probs.max(dim=-1)
    return confidence, token


def threshold_select(confidence, token, block, mask_id: int, threshold):
    """confidence, token, block: [B, N]. Commit every masked position whose confidence reaches
    `threshold`, and always the row's most confident masked position. Writes `block` in place and
    returns the accepted-position mask."""
    masked = block == mask_id
    confidence = torch.where(masked, confidence, float("-inf"))
    row_best = confidence.amax(dim=-1, keepdim=True)
    accept = masked & ((confidence >= threshold) | (confidence == row_best))
    block.copy_(torch.where(accept, token, block))
    return accept


def topk_select(confidence, token, block, mask_id: int, k: torch.Tensor):
    """Commit the k[b] most confident masked positions of each row b (k: int64 [B]). Ties go to
    the lower position. Writes `block` in place and returns the accepted-position mask."""
    masked = block == mask_id
    confidence = torch.where(masked, confidence, float("-inf"))
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    accept = masked & (rank < k.unsqueeze(-1))
    block.copy_(torch.where(accept, token, block))
    return accept


# ---------------------------------------------------------------------------------------------
# Fused kernels.
#
# Vocabulary pass (`_vocab_pass_kernel`, grid rows x splits): every program streams its slice of
# one logits row once, keeping per-lane running state in registers: max m, sum of exp(x - m),
# and the argmax (first index among ties: a lane only moves on a strictly larger value and tiles
# go left to right; across lanes the smallest index among equal keys wins). Greedy, a tile is held
# as TILE_ROWS rows of lanes and reduced over its rows inside each thread first, so the running sum
# is rescaled once per TILE_ROWS elements (per element one exp, one add and a max), and a lane
# keeps only the tile where its max was first reached; after the pass the winning lanes' tiles are
# read again for the first column holding the row's max. At temperature > 0 the argmax key is
# the exponential race x / T - log(E), E = -log(U), U = tl.rand(seed, row * V + col) drawn in-kernel,
# and the raw logit at the winner is kept for its probability. Rows whose block token is not the
# mask id skip the pass (MASKED_ONLY). With one split the program writes (confidence, token)
# directly; otherwise it writes partials that the second kernel folds.
#
# Combine + select (`_select_kernel`, grid = batch rows): folds the [N, splits] partials of one
# block row (or reads given confidence/token), then applies threshold or top-k acceptance and
# writes accepted tokens into the block in place: no host sync, everything stays on the device.

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import functools  # noqa: E402

from difuse.patterns._rows import (  # noqa: E402
    PlanCache,
    RowView,
    cdiv,
    check_float,
    check_runtime_device,
    check_same_device,
    next_pow2,
    row_view,
    sm_count,
    tensor_key,
)

_NO_INDEX = tl.constexpr(2**31 - 1)  # "no token yet"; also bounds the vocabulary (int32 indices)
_SELECT_NONE, _SELECT_THRESHOLD, _SELECT_TOPK = 0, 1, 2
_TOPK_MAX_BLOCK = 256  # top-k ranks by an [N, N] comparison held in registers


_LOWEST = tl.constexpr(-3.4028234663852886e38)  # lowest finite float32


@triton.jit
def _fold_tile(x, tile_start, tile, m, s, best_i, best_k, best_l, row, V, temperature, rng_seed,
               SAMPLE: tl.constexpr):
    """Fold one tile x [TILE_ROWS, width] (fp32, -inf where masked; columns tile_start + tile) into
    the per-lane running state [width]."""
    if SAMPLE:
        # One row per tile: per element one exp, exp(min(x, m) - max(x, m)), rescales whichever
        # side is smaller, and the key race keeps its column and logit.
        x = tl.max(x, axis=0)  # the tile's one row
        cols = tile_start + tl.max(tile, axis=0)
        m_new = tl.maximum(m, x)
        e = tl.exp(tl.minimum(m, x) - m_new)
        s = tl.where(x > m, s * e + 1.0, s + e)
        u = tl.rand(rng_seed, row * V + cols)
        key = x / temperature - tl.log(-tl.log(u))
        take = key > best_k
        best_k = tl.where(take, key, best_k)
        best_i = tl.where(take, cols, best_i)
        best_l = tl.where(take, x, best_l)
    else:
        # The rows reduce inside each thread: one rescale of the running sum per TILE_ROWS
        # elements, and best_i keeps the start of the tile where the lane's max was first reached
        # (the column inside it is found once, after the pass).
        tile_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        best_i = tl.where(tile_max > m, tile_start, best_i)
    return m_new, s, best_i, best_k, best_l


@triton.jit(do_not_specialize=["mask_id", "seed"])
def _vocab_pass_kernel(
    logits_ptr, l_inner, l_so, l_si, V,
    block_ptr, b_inner, b_so, b_si, mask_id,
    temperature, seed,
    part_m, part_s, part_k, part_i, part_l,  # [rows, SPLITS] partials (when not FINAL)
    conf_ptr, token_ptr,  # [rows] outputs (when FINAL)
    chunk,  # columns per split, a multiple of BLOCK_V
    SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TILE_ROWS: tl.constexpr,  # a BLOCK_V tile folds as [TILE_ROWS, BLOCK_V // TILE_ROWS]
    MASKED_ONLY: tl.constexpr,
    SAMPLE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    FINAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if SEED_FROM_PTR:
        rng_seed = tl.load(seed)
    else:
        rng_seed = seed
    active = True
    if MASKED_ONLY:
        active = tl.load(block_ptr + (row // b_inner) * b_so + (row % b_inner) * b_si) == mask_id
    if active:
        row_ptr = logits_ptr + (row // l_inner) * l_so + (row % l_inner) * l_si
        width: tl.constexpr = BLOCK_V // TILE_ROWS
        tile = tl.arange(0, TILE_ROWS)[:, None] * width + tl.arange(0, width)[None, :]  # [TILE_ROWS, width]
        # The running max starts at the lowest finite float, not -inf: exp(m - m_new) then never
        # sees -inf - -inf, so the loop needs no NaN guard (a lane that saw only -inf keeps s = 0).
        m = tl.full((width,), _LOWEST, tl.float32)
        s = tl.zeros((width,), tl.float32)
        best_i = tl.full((width,), _NO_INDEX, tl.int32)
        best_k = tl.full((width,), float("-inf"), tl.float32)
        best_l = tl.full((width,), float("-inf"), tl.float32)
        start = split * chunk
        # Whole tiles load without a mask; the split's last, partial tile (if any) with one.
        end = tl.minimum(chunk, V - start)
        full = end - end % BLOCK_V
        for offset in tl.range(0, full, BLOCK_V, num_stages=3):
            x = tl.load(row_ptr + start + offset + tile).to(tl.float32)
            m, s, best_i, best_k, best_l = _fold_tile(x, start + offset, tile, m, s, best_i, best_k, best_l,
                                                      row, V, temperature, rng_seed, SAMPLE)
        for offset in range(full, end, BLOCK_V):
            cols = start + offset + tile
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m, s, best_i, best_k, best_l = _fold_tile(x, start + offset, tile, m, s, best_i, best_k, best_l,
                                                      row, V, temperature, rng_seed, SAMPLE)
        row_max = tl.max(m, axis=0)
        row_sum = tl.sum(s * tl.exp(m - row_max), axis=0)  # a lane that saw only -inf adds 0
        if SAMPLE:
            key_max = tl.max(best_k, axis=0)
            index = tl.min(tl.where(best_k == key_max, best_i, _NO_INDEX), axis=0)
            logit = tl.max(tl.where(best_i == index, best_l, float("-inf")), axis=0)
        else:
            # The first column holding the max: read again the winning lanes' tiles (one lane,
            # unless the max is tied) and take the first match.
            key_max = row_max
            winner = (m == row_max) & (best_i != _NO_INDEX)
            cols = tl.where(winner, best_i, 0)[None, :] + tile
            again = tl.load(row_ptr + cols, mask=winner[None, :] & (cols < V), other=float("-inf")).to(tl.float32)
            index = tl.min(tl.min(tl.where(again == row_max, cols, _NO_INDEX), axis=1), axis=0)
            logit = row_max
        if FINAL:
            tl.store(conf_ptr + row, tl.exp(logit - row_max) / row_sum)
            tl.store(token_ptr + row, index.to(tl.int64))
        else:
            at = row * SPLITS + split
            tl.store(part_m + at, row_max)
            tl.store(part_s + at, row_sum)
            tl.store(part_k + at, key_max)
            tl.store(part_i + at, index)
            if SAMPLE:
                tl.store(part_l + at, logit)


@triton.jit(do_not_specialize=["mask_id"])
def _select_kernel(
    part_m, part_s, part_k, part_i, part_l,  # [B * N, SPLITS] partials (FROM_PARTIALS)
    conf_ptr, c_sb, c_sn, token_ptr, t_sb, t_sn,  # given [B, N] confidence and token (else)
    block_ptr, b_sb, b_sn, mask_id,  # [B, N] block, written in place
    threshold, k,  # acceptance parameters (scalars or pointers, see *_FROM_PTR)
    accept_ptr,  # [B, N] bool output
    out_conf_ptr, out_token_ptr,  # [B * N] outputs (MODE == none); out_conf_ptr: scratch (top-k)
    N, n_rows,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
    SAMPLE: tl.constexpr,
    MODE: tl.constexpr,
    THRESHOLD_FROM_PTR: tl.constexpr,
    K_FROM_PTR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    rows = b * N + n
    n_ok = (n < N) & (rows < n_rows)
    if MODE == 0:
        masked = n_ok
        block_tok = tl.zeros((BLOCK_N,), tl.int64)
    else:
        block_tok = tl.load(block_ptr + b * b_sb + n * b_sn, mask=n_ok, other=0)
        masked = n_ok & (block_tok == mask_id)
    if FROM_PARTIALS:
        at = rows[:, None] * SPLITS + tl.arange(0, BLOCK_S)[None, :]
        pmask = masked[:, None] & (tl.arange(0, BLOCK_S) < SPLITS)[None, :]
        m = tl.load(part_m + at, mask=pmask, other=float("-inf"))
        s = tl.load(part_s + at, mask=pmask, other=0.0)
        key = tl.load(part_k + at, mask=pmask, other=float("-inf"))
        index = tl.load(part_i + at, mask=pmask, other=_NO_INDEX)
        # Rows left out (unmasked, padding) have only -inf: fold them against 0 to avoid NaN.
        row_max = tl.where(masked, tl.max(m, axis=1), 0.0)
        row_sum = tl.where(masked, tl.sum(s * tl.exp(m - row_max[:, None]), axis=1), 1.0)
        key_max = tl.max(key, axis=1)
        token = tl.min(tl.where(key == key_max[:, None], index, _NO_INDEX), axis=1)
        if SAMPLE:
            logit = tl.load(part_l + at, mask=pmask, other=float("-inf"))
            logit = tl.max(tl.where(index == token[:, None], logit, float("-inf")), axis=1)
        else:
            logit = row_max
        conf = tl.exp(logit - row_max) / row_sum
        token = token.to(tl.int64)
    else:
        conf = tl.load(conf_ptr + b * c_sb + n * c_sn, mask=masked, other=float("-inf")).to(tl.float32)
        token = tl.load(token_ptr + b * t_sb + n * t_sn, mask=masked, other=0).to(tl.int64)
    if MODE == 0:
        tl.store(out_conf_ptr + rows, conf, mask=n_ok)
        tl.store(out_token_ptr + rows, token, mask=n_ok)
    else:
        conf = tl.where(masked, conf, float("-inf"))
        if MODE == 1:
            if THRESHOLD_FROM_PTR:
                threshold = tl.load(threshold).to(tl.float32)
            row_best = tl.max(conf, axis=0)
            accept = masked & ((conf >= threshold) | (conf == row_best))
        else:
            if K_FROM_PTR:
                k = tl.load(k + b)
            if FROM_PARTIALS:
                # The GPU compiler may fold the partials twice, once per layout of conf[:, None] and
                # conf[None, :], summing in different orders: a position could then rank behind
                # itself. Comparing two loads of one stored copy keeps the ranks a permutation.
                tl.store(out_conf_ptr + rows, conf, mask=n_ok)
                tl.debug_barrier()
                conf = tl.load(out_conf_ptr + rows, mask=n_ok, other=float("-inf"))
            # Stable descending rank: positions before i that are larger, or equal and earlier.
            c_i = conf[:, None]
            c_j = conf[None, :]
            earlier = n[None, :] < n[:, None]
            ahead = (c_j > c_i) | ((c_j == c_i) & earlier)
            rank = tl.sum(ahead.to(tl.int32), axis=1)
            accept = masked & (rank < k)
        tl.store(block_ptr + b * b_sb + n * b_sn, token.to(block_ptr.dtype.element_ty), mask=accept)
        tl.store(accept_ptr + rows, accept, mask=n_ok)


# ---------------------------------------------------------------------------------------------
# Host wrappers.

_DEFAULT_BLOCK_V = 4096
_SPLIT_BLOCK_V = 2048
# The greedy pass's tile of BLOCK_V values folds as [TILE_ROWS, BLOCK_V / TILE_ROWS], WARP_VALUES of
# them per warp; the sampling pass takes one row per tile, SAMPLE_WARP_VALUES per warp (H200,
# bench/results/tune-confidence-tile-rows-h200.log).
TILE_ROWS = 4
WARP_VALUES = 1024
SAMPLE_WARP_VALUES = 512


def _check_logits(logits: torch.Tensor) -> None:
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.shape[-1] >= _NO_INDEX.value:
        raise ValueError(f"vocabulary of {logits.shape[-1]} entries exceeds the int32 token index range")
    check_runtime_device(logits)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a non-negative Python number, got {temperature!r}")
    return float(temperature)


def _seed_arg(seed, device: torch.device):
    """An int seed, or a 0-dim integer device tensor (changeable between CUDA-graph replays)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype not in (torch.int64, torch.int32) or seed.device != device:
            raise ValueError(f"seed tensor must be a 0-dim int32/int64 tensor on {device}")
        return seed, True
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a 0-dim integer tensor, got {type(seed).__name__}")
    return seed & (2**63 - 1), False


def choose_splits(rows: int, vocab: int, device: torch.device, block_v: int = _SPLIT_BLOCK_V) -> int:
    """Vocabulary splits per row: aim at ~4 programs per SM (32 rows x 1 program would leave most
    of an H100's 132 SMs idle), at least two BLOCK_V tiles per split."""
    wanted = cdiv(4 * sm_count(device), max(rows, 1))
    return max(1, min(wanted, vocab // (2 * block_v)))


@functools.lru_cache(maxsize=4096)
def plan_vocab_pass(rows: int, vocab: int, device: torch.device, splits: int | None = None,
                    block_v: int | None = None) -> tuple[int, int, int]:
    """(splits, block_v, chunk): one pass with 4096-wide tiles when the rows fill the GPU, else
    2048-wide tiles (finer splits, e.g. 32 x 126464 -> 16 splits of 8192 columns per row).
    Cached: the wrappers plan every call."""
    if block_v is None:
        wide = splits == 1 or (splits is None and choose_splits(rows, vocab, device) == 1)
        block_v = min(_DEFAULT_BLOCK_V if wide else _SPLIT_BLOCK_V, next_pow2(vocab))
    if splits is None:
        splits = choose_splits(rows, vocab, device, block_v)
    if splits < 1 or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"splits must be >= 1 and block_v a power of two, got {splits}, {block_v}")
    chunk = cdiv(cdiv(vocab, splits), block_v) * block_v
    return cdiv(vocab, chunk), block_v, chunk


_LOGITS_ROWS = PlanCache()


def _logits_rows(logits: torch.Tensor) -> RowView:
    """row_view of the logits, its layout planned once per (shape, strides, dtype, device)."""
    copy, layout = _LOGITS_ROWS.get(tensor_key(logits), lambda: _row_layout(logits))
    if copy:
        return row_view(logits)
    return RowView(logits, *layout)


def _row_layout(t: torch.Tensor) -> tuple[bool, tuple]:
    view = row_view(t)
    return view.tensor is not t, (view.rows, view.inner, view.stride_outer, view.stride_inner)


def _vocab_pass(logits, block, mask_id, temperature, seed, splits, block_v, final):
    """Launch the vocabulary pass over the rows of logits [..., V]. Returns partials or (conf, token)."""
    view = _logits_rows(logits)
    V = logits.shape[-1]
    device = logits.device
    splits, block_v, chunk = plan_vocab_pass(view.rows, V, device, splits, block_v)
    sample = temperature > 0
    tile_rows = 1 if sample else min(TILE_ROWS, block_v)  # sampling: the key race per element
    if final and splits != 1:
        raise ValueError("a final vocabulary pass needs a single split")
    seed, seed_from_ptr = _seed_arg(seed, device)
    f32 = dict(dtype=torch.float32, device=device)
    shape = (view.rows, splits)
    if final:
        conf = torch.empty(view.rows, **f32)
        token = torch.empty(view.rows, dtype=torch.int64, device=device)
        partials = (conf,) * 5
    else:
        # one allocation for the float partials (m, s, key and, when sampling, the winner's logit)
        floats = torch.empty((4 if sample else 3, *shape), **f32).unbind(0)
        partials = (*floats[:3], torch.empty(shape, dtype=torch.int32, device=device), floats[-1])
        conf = token = partials[0]
    if block is not None:
        block_args = (block, block.shape[1], *block.stride(), int(mask_id))
    else:
        block_args = (logits, 1, 0, 0, 0)
    if view.rows:
        _vocab_pass_kernel[(view.rows, splits)](
            view.tensor, view.inner, view.stride_outer, view.stride_inner, V,
            *block_args,
            temperature if sample else 1.0, seed,
            *partials,
            conf, token,
            chunk,
            SPLITS=splits,
            BLOCK_V=block_v,
            TILE_ROWS=tile_rows,
            MASKED_ONLY=block is not None,
            SAMPLE=sample,
            SEED_FROM_PTR=seed_from_ptr,
            FINAL=final,
            num_warps=max(1, min(16, block_v // (SAMPLE_WARP_VALUES if sample else WARP_VALUES))),
        )
    if final:
        return conf, token
    return partials, splits


class RowBlock:
    """The [B, N] block of token ids the selection reads and writes in place."""

    def __init__(self, block: torch.Tensor):
        if not isinstance(block, torch.Tensor) or block.dtype not in (torch.int64, torch.int32):
            raise TypeError("block must be an int64 or int32 tensor of token ids")
        if block.dim() != 2:
            raise ValueError(f"block must be [B, N], got shape {tuple(block.shape)}")
        self.batch, self.n = block.shape
        self.stride_b, self.stride_n = block.stride()


def _check_mask_id(mask_id) -> int:
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be a Python int, got {type(mask_id).__name__}")
    return mask_id


def _threshold_arg(threshold, device):
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0 or not threshold.is_floating_point() or threshold.device != device:
            raise ValueError(f"threshold tensor must be a 0-dim float tensor on {device}")
        return threshold, True
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a 0-dim float tensor, got {type(threshold).__name__}")
    return float(threshold), False


def _k_arg(k, batch: int, device):
    if isinstance(k, torch.Tensor):
        if k.shape != (batch,) or k.dtype not in (torch.int64, torch.int32) or k.device != device:
            raise ValueError(f"k must be an int64/int32 tensor [B] = [{batch}] on {device}")
        return k.contiguous(), True
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int or an integer tensor [B], got {type(k).__name__}")
    return k, False


def _launch_select(block, mask_id, mode, threshold=0.0, k=0, partials=None, splits=1, sample=False,
                   conf=None, token=None):
    rb = RowBlock(block)
    device = block.device
    if mode == _SELECT_TOPK and rb.n > _TOPK_MAX_BLOCK:
        raise ValueError(f"top-k selection supports blocks of at most {_TOPK_MAX_BLOCK} positions, got {rb.n}")
    threshold, threshold_from_ptr = _threshold_arg(threshold, device)
    k, k_from_ptr = _k_arg(k, rb.batch, device)
    accept = torch.empty((rb.batch, rb.n), dtype=torch.bool, device=device)
    if accept.numel() == 0:
        return accept
    if partials is None:
        partials = (conf,) * 5
        given = (conf, conf.stride(0), conf.stride(1), token, token.stride(0), token.stride(1))
        folded = accept
    else:
        given = (block, 0, 0, block, 0, 0)
        # the top-k rank compares the folded confidences through this scratch copy
        folded = torch.empty(rb.batch * rb.n, dtype=torch.float32, device=device) if mode == _SELECT_TOPK \
            else accept
    _select_kernel[(rb.batch,)](
        *partials,
        *given,
        block, rb.stride_b, rb.stride_n, mask_id,
        threshold, k,
        accept, folded, accept,
        rb.n, rb.batch * rb.n,
        SPLITS=splits,
        BLOCK_N=next_pow2(rb.n),
        BLOCK_S=next_pow2(splits),
        FROM_PARTIALS=conf is None,
        SAMPLE=sample,
        MODE=mode,
        THRESHOLD_FROM_PTR=threshold_from_ptr,
        K_FROM_PTR=k_from_ptr,
        num_warps=4,
    )
    return accept


def fused_token_confidence(logits: torch.Tensor, temperature: float = 0.0, seed=0, *, splits: int | None = None,
                           block_v: int | None = None):
    """Triton token_confidence: logits [..., V] -> (confidence fp32 [...], token int64 [...]).

    One pass over the vocabulary per row; `splits` > 1 (default: chosen from rows and SM count)
    splits each row over several programs and folds the partials in a second tiny kernel.
    At temperature > 0 the Gumbel noise comes from tl.rand(seed, ...): same seed, same tokens.
    """
    _check_logits(logits)
    temperature = _check_temperature(temperature)
    lead = logits.shape[:-1]
    view_rows = logits.numel() // logits.shape[-1]
    splits, block_v, _ = plan_vocab_pass(view_rows, logits.shape[-1], logits.device, splits, block_v)
    if splits == 1 or view_rows == 0:
        conf, token = _vocab_pass(logits, None, 0, temperature, seed, 1, block_v, final=True)
        return conf.view(lead), token.view(lead)
    partials, splits = _vocab_pass(logits, None, 0, temperature, seed, splits, block_v, final=False)
    conf = torch.empty(view_rows, dtype=torch.float32, device=logits.device)
    token = torch.empty(view_rows, dtype=torch.int64, device=logits.device)
    group = 32
    _select_kernel[(cdiv(view_rows, group),)](
        *partials,
        conf, 0, 0, token, 0, 0,
        token, 0, 0, 0,
        0.0, 0,
        conf, conf, token,
        group, view_rows,
        SPLITS=splits, BLOCK_N=group, BLOCK_S=next_pow2(splits),
        FROM_PARTIALS=True, SAMPLE=temperature > 0, MODE=_SELECT_NONE,
        THRESHOLD_FROM_PTR=False, K_FROM_PTR=False,
        num_warps=4,
    )
    return conf.view(lead), token.view(lead)


def _check_selection_inputs(logits, block, mask_id):
    _check_logits(logits)
    rb = RowBlock(block)
    check_same_device(logits=logits, block=block)
    lead = tuple(logits.shape[:-1])
    if lead not in ((rb.batch, rb.n), (rb.batch * rb.n,)):
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, N, V] or [B*N, V] for block [B, N] = "
                         f"{tuple(block.shape)}")
    return _check_mask_id(mask_id)


def confidence_threshold_select(logits, block, mask_id: int, threshold, temperature: float = 0.0, seed=0, *,
                                splits: int | None = None, block_v: int | None = None) -> torch.Tensor:
    """token_confidence + threshold_select in two launches, visiting the vocabulary only for
    masked positions. logits [B, N, V] or [B*N, V]; block [B, N] is updated in place; returns the
    accepted-position mask [B, N]. threshold: float or 0-dim device tensor."""
    mask_id = _check_selection_inputs(logits, block, mask_id)
    temperature = _check_temperature(temperature)
    partials, splits = _vocab_pass(logits, block, mask_id, temperature, seed, splits, block_v, final=False)
    return _launch_select(block, mask_id, _SELECT_THRESHOLD, threshold=threshold, partials=partials,
                          splits=splits, sample=temperature > 0)


def confidence_topk_select(logits, block, mask_id: int, k, temperature: float = 0.0, seed=0, *,
                           splits: int | None = None, block_v: int | None = None) -> torch.Tensor:
    """token_confidence + topk_select fused like confidence_threshold_select; k: int or int tensor [B]."""
    mask_id = _check_selection_inputs(logits, block, mask_id)
    temperature = _check_temperature(temperature)
    partials, splits = _vocab_pass(logits, block, mask_id, temperature, seed, splits, block_v, final=False)
    return _launch_select(block, mask_id, _SELECT_TOPK, k=k, partials=partials, splits=splits,
                          sample=temperature > 0)


def _check_conf_token(confidence, token, block):
    check_float("confidence", confidence)
    if not isinstance(token, torch.Tensor) or token.dtype not in (torch.int64, torch.int32):
        raise TypeError("token must be an int64 or int32 tensor")
    RowBlock(block)
    if confidence.shape != block.shape or token.shape != block.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)}, token {tuple(token.shape)} and block "
                         f"{tuple(block.shape)} must all be [B, N]")
    check_same_device(confidence=confidence, token=token, block=block)
    check_runtime_device(block)


def fused_threshold_select(confidence, token, block, mask_id: int, threshold) -> torch.Tensor:
    """Triton threshold_select (one launch per step, no host sync)."""
    _check_conf_token(confidence, token, block)
    return _launch_select(block, _check_mask_id(mask_id), _SELECT_THRESHOLD, threshold=threshold,
                          conf=confidence, token=token)


def fused_topk_select(confidence, token, block, mask_id: int, k) -> torch.Tensor:
    """Triton topk_select (one launch per step, no host sync)."""
    _check_conf_token(confidence, token, block)
    return _launch_select(block, _check_mask_id(mask_id), _SELECT_TOPK, k=k, conf=confidence, token=token)


def token_confidence_bytes(logits: torch.Tensor, temperature: float = 0.0) -> int:
    rows = logits.numel() // logits.shape[-1]
    return logits.numel() * logits.element_size() + rows * (4 + 8)


def confidence_select_bytes(logits: torch.Tensor, block: torch.Tensor, *_, **__) -> int:
    """Every logits row read once (the fewest bytes when all positions are masked), plus the block
    read, its in-place write and the accept mask."""
    return logits.numel() * logits.element_size() + block.numel() * (2 * block.element_size() + 1)


def select_bytes(confidence, token, block, *_, **__) -> int:
    n = block.numel()
    return n * (confidence.element_size() + token.element_size() + 2 * block.element_size() + 1)
