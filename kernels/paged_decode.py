"""Paged decode attention: one query token per sequence against its paged K/V.

Decode is bound by reading the KV cache, so the kernel is organised around loading each K/V
tile exactly once: a program owns one (sequence, KV head) pair and all the query heads that
share that KV head (GQA), padded to 16 rows, the height of one tensor-core MMA. Batch 1 with a long
context would then leave most of the GPU idle, so the context can also be split across programs
(flash-decoding): each split writes an unnormalised partial result with its running max and sum,
and a small second kernel merges the splits.

8-bit pools (int8 or fp8 e4m3 with per-(slot, head) scales, see `edgepaged.attention.QuantizedCache`)
are read by the same kernel with KV_QUANT set: the tiles come in at half the bytes and are
dequantized in registers (`attend_tile`); with KV_QUANT off the 16-bit code is what it was.

Launch contract (shared with the TensorRT plugin, which launches the same PTX): pointers,
integers and compile-time constants only. The softmax scale is a constant because a TensorRT
ahead-of-time launch can only pass integer arguments, and it is fixed per model anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .write_kv import check_scales

LOG2E = 1.4426950408889634

# A split should stream enough of the cache to hide its launch and merge cost.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64
# Split lengths are multiples of every decode tile width, so a plan fits any dtype.
_SPLIT_ALIGN = 64
SPLIT_ALIGN = tl.constexpr(_SPLIT_ALIGN)


@triton.jit
def attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_table_ptr,
    kv_head_offset_k,
    kv_head_offset_v,
    kv_head,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_sb,
    stride_ss,
    start,
    key_end,
    q_pos,
    offs_d,
    d_mask,
    MASK_KEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N) of one sequence.

    Keys are gathered token by token through the block table, so a tile may span several
    KV blocks and BLOCK_N does not depend on the cache's block size. Scores live in the log2
    domain (QK_SCALE carries log2(e)) so the exponentials are plain exp2. Tiles that lie wholly
    inside the visible range skip every mask (MASK_KEYS=False, CAUSAL=False); only the tail
    tile, and in prefill the diagonal tiles, pay for them. Masked keys are loaded as zeros so a
    stale or poisoned slot past the context never reaches the value accumulation. `q_pos` holds
    each query row's position and is read only when CAUSAL.

    KV_QUANT: the pools hold 8-bit codes (int8 or fp8 e4m3) and `k_scale_ptr`/`v_scale_ptr`
    one scale per (slot, KV head), at block * stride_sb + offset * stride_ss + kv_head. The
    codes are converted to q's dtype (exact: |code| <= 127 or e4m3's 3-bit mantissa) and the
    scales are applied to the [rows, BLOCK_N] matrices rather than the [BLOCK_N, head_dim]
    tiles: K's scale multiplies the scores after q.k (one scale per key column, folded into
    QK_SCALE), V's the probabilities before p.v. That is the same arithmetic, sum_n p_n s_n v_n,
    at rows x BLOCK_N multiplies per tile instead of BLOCK_N x head_dim: 16 x 64 against 64 x 128
    for a decode tile at head dim 128, equal at worst (prefill, 64 rows, head dim 64). The
    running sum l_i takes the unscaled probabilities. Without KV_QUANT the scale arguments are
    never read and this is the 16-bit tile unchanged.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        key_ok = offs_n < key_end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
    token_offset = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
    k_ptrs = k_cache_ptr + kv_head_offset_k + token_offset[:, None] + offs_d[None, :]
    value_offset = block_ids.to(tl.int64) * stride_vb + (offs_n % BLOCK_SIZE) * stride_vs
    v_ptrs = v_cache_ptr + kv_head_offset_v + value_offset[:, None] + offs_d[None, :]
    if MASK_KEYS:
        kv_mask = key_ok[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)

    if KV_QUANT:
        scale_ptrs = block_ids.to(tl.int64) * stride_sb + (offs_n % BLOCK_SIZE) * stride_ss + kv_head
        if MASK_KEYS:
            k_s = tl.load(k_scale_ptr + scale_ptrs, mask=key_ok, other=0.0).to(tl.float32)
            v_s = tl.load(v_scale_ptr + scale_ptrs, mask=key_ok, other=0.0).to(tl.float32)
        else:
            k_s = tl.load(k_scale_ptr + scale_ptrs).to(tl.float32)
            v_s = tl.load(v_scale_ptr + scale_ptrs).to(tl.float32)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_s * QK_SCALE)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
    if CAUSAL:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < key_end), s, float("-inf"))
    elif MASK_KEYS:
        s = tl.where(key_ok[None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_QUANT:
        p = p * v_s[None, :]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_len(context_len, num_splits, min_split_len):
    """Keys per split for one sequence: its context over `num_splits`, rounded up to
    SPLIT_ALIGN keys, and never below `min_split_len`. Each sequence is cut for its own length,
    not the batch's longest, so a plan sized for a long context (a captured graph's worst
    case) splits a short one just as a plan made for that short one would."""
    return tl.maximum(tl.cdiv(tl.cdiv(context_len, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN, min_split_len)


# Per-step values (see paged_prefill.py) are not specialised on: one compile serves every step.
@triton.jit(do_not_specialize=["split_len", "stride_bt"])
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    context_lens_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    counters_ptr,
    queries_per_kv,
    split_len,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_sb,
    stride_ss,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    KV_QUANT: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (sequence, KV head, split). Without SPLIT the one split covers the whole context
    and the program writes the normalised output; with SPLIT it writes its partial state.
    KV_QUANT reads 8-bit pools and their scales (see `attend_tile`). MERGE (with SPLIT): the
    last split of a (sequence, KV head) to finish merges them all, so no merge kernel runs."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * queries_per_kv
    num_splits = tl.num_programs(2)

    context_len = tl.load(context_lens_ptr + seq)
    if SPLIT:
        seq_split_len = _split_len(context_len, num_splits, split_len)
        start = split * seq_split_len
        if start >= context_len:
            if MERGE and split == 0:  # an empty context (a padded row) yields zeros, as the merge kernel's
                offs = tl.arange(0, BLOCK_G)[:, None] * stride_oh + tl.arange(0, BLOCK_D)[None, :]
                ok = (tl.arange(0, BLOCK_G)[:, None] < queries_per_kv) & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
                dst = out_ptr + seq.to(tl.int64) * stride_ob + kv_head * queries_per_kv * stride_oh + offs
                tl.store(dst, tl.zeros([BLOCK_G, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=ok)
            return  # the merge only reads splits that hold keys
        end = tl.minimum(start + seq_split_len, context_len)
    else:
        start = 0
        end = context_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    head = kv_head * queries_per_kv + offs_g
    row_ok = offs_g < queries_per_kv
    seq64 = seq.to(tl.int64)
    q = tl.load(
        q_ptr + seq64 * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq64 * stride_bt
    k_head = kv_head.to(tl.int64) * stride_kh
    v_head = kv_head.to(tl.int64) * stride_vh
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, k_head, v_head,
            kv_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
            n, end, offs_g, offs_d, d_mask,
            False, False, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, KV_QUANT,
        )
    if full_end < end:
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, k_head, v_head,
            kv_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
            full_end, end, offs_g, offs_d, d_mask,
            True, False, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, KV_QUANT,
        )

    if SPLIT:
        row = (seq64 * num_q_heads + head) * num_splits + split
        tl.store(partial_max_ptr + row, m_i, mask=row_ok)
        tl.store(partial_sum_ptr + row, l_i, mask=row_ok)
        tl.store(
            partial_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=row_ok[:, None] & d_mask[None, :],
        )
        if MERGE:
            # The splits that hold keys each count in once; the one that counts last sees every
            # other's partials (the barrier orders this program's stores before its release,
            # the acquire orders the reads after it) and resets the counter for the next launch.
            used = tl.cdiv(context_len, seq_split_len)
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            tl.debug_barrier()
            if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:
                for g in range(queries_per_kv):
                    _merge_head(out_ptr + seq64 * stride_ob + (kv_head * queries_per_kv + g) * stride_oh,
                                partial_out_ptr, partial_max_ptr, partial_sum_ptr,
                                (seq64 * num_q_heads + kv_head * queries_per_kv + g) * num_splits, used,
                                HEAD_DIM, BLOCK_D, BLOCK_S, True)
                tl.atomic_xchg(counter, 0)
    else:
        # An empty context (a padded row of a captured batch) yields zeros, not 0/0.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + seq64 * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_mask[None, :],
        )


@triton.jit
def _merge_head(out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr, first_row, used,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, UNCACHED: tl.constexpr):
    """One query head's output from the `used` partial states at rows first_row...: rescale each
    to the global max and normalise once. UNCACHED reads around L1 (the partials were written by
    other programs of the same launch)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < used
    row = first_row + offs_s
    modifier: tl.constexpr = ".cg" if UNCACHED else ""
    m = tl.load(partial_max_ptr + row, mask=s_ok, other=float("-inf"), cache_modifier=modifier)
    l = tl.load(partial_sum_ptr + row, mask=s_ok, other=0.0, cache_modifier=modifier)
    part = tl.load(
        partial_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
        cache_modifier=modifier,
    )
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_ok, tl.exp2(m - m_max), 0.0)
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["split_len", "num_splits"])
def _merge_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    context_lens_ptr,
    split_len,
    num_splits,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (sequence, query head): merge the head's splits. Splits past the context were never
    written, so they are masked by count."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    context_len = tl.load(context_lens_ptr + seq)
    used = tl.cdiv(context_len, _split_len(context_len, num_splits, split_len))
    _merge_head(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh, partial_out_ptr, partial_max_ptr,
                partial_sum_ptr, (seq.to(tl.int64) * num_q_heads + head) * num_splits, used,
                HEAD_DIM, BLOCK_D, BLOCK_S, False)


@dataclass(slots=True)
class DecodePlan:
    """How one decode step is split over the context, plus the scratch the splits write to.

    Built once per step (the backend's `prepare`) and shared by every layer, so the per-layer
    launch allocates nothing. A plan made for `max_context_len` serves any batch whose contexts
    are no longer: each sequence divides its own context over `num_splits` (in the kernel, see
    `_split_len`), and splits past its context return at once. That is what lets a CUDA graph
    captured with a worst-case plan replay for short contexts without losing parallelism.
    """

    num_seqs: int
    num_q_heads: int
    head_dim: int
    split_len: int  # the fewest keys a split may hold; a sequence's own split length is derived from it
    num_splits: int
    partial_out: torch.Tensor | None  # fp32 [num_seqs, num_q_heads, num_splits, head_dim]
    partial_max: torch.Tensor | None  # fp32 [num_seqs, num_q_heads, num_splits], log2 domain
    partial_sum: torch.Tensor | None  # fp32 [num_seqs, num_q_heads, num_splits]
    # int32 [num_seqs, num_kv_heads], zeroed: splits count in here and the last one merges (one
    # launch instead of two). None: the merge kernel runs.
    counters: torch.Tensor | None = None


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). fp32 dots run on FMA units and hold whole tiles in
    registers, so fp32 takes 16-key tiles over 8 warps to stay clear of spills (checked in the
    sm_86/sm_90 cubins for head dims 64 and 128); 16-bit tiles of 64 keys fit 4 warps without
    spilling, over 16-bit or 8-bit pools alike. (fp32 queries over an 8-bit pool, which no
    shipped GPU profile runs, spill about 128 bytes at head dim 128 on sm_87 whatever the tile:
    correct, not tuned.) Every BLOCK_N here must divide _SPLIT_ALIGN."""
    return (16, 8, 2) if dtype == torch.float32 else (64, 4, 2)


def plan_decode(
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context_len: int,
    device: torch.device | str,
    *,
    num_splits: int | None = None,
    merge_in_kernel: bool = False,
) -> DecodePlan:
    """Choose the split of the context for a decode step and allocate its scratch.

    The heuristic only splits when the (sequence, KV head) programs alone cannot fill the GPU
    twice over, and never below _MIN_SPLIT_TOKENS keys per split: at batch 1 a 4k context gets
    16 splits on an H100, at batch 256 none. `num_splits` overrides it (tests use that to
    exercise the split path on small shapes); the count may come out lower once split lengths
    are rounded up to _SPLIT_ALIGN. Shorter sequences of the batch get shorter splits, down to
    _MIN_SPLIT_TOKENS keys (or the longest one's split, if that is shorter). `merge_in_kernel`
    makes a split plan one launch: the last split of each (sequence, KV head) merges.
    """
    device = torch.device(device)
    max_context_len = max(max_context_len, 1)
    if num_splits is None:
        programs = max(num_seqs * num_kv_heads, 1)
        wanted = triton.cdiv(2 * _sm_count(device), programs)
        num_splits = min(wanted, triton.cdiv(max_context_len, _MIN_SPLIT_TOKENS), _MAX_SPLITS)
    num_splits = max(1, num_splits)
    longest_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    num_splits = triton.cdiv(max_context_len, longest_split)
    min_split_len = min(longest_split, _MIN_SPLIT_TOKENS)
    if num_splits == 1:
        return DecodePlan(num_seqs, num_q_heads, head_dim, min_split_len, 1, None, None, None)
    shape = (num_seqs, num_q_heads, num_splits)
    return DecodePlan(
        num_seqs,
        num_q_heads,
        head_dim,
        min_split_len,
        num_splits,
        torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.float32, device=device),
        torch.zeros(num_seqs, num_kv_heads, dtype=torch.int32, device=device) if merge_in_kernel else None,
    )


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> int:
    """Validate shapes and dtypes (metadata only: no device sync); returns queries per KV head.
    8-bit caches (int8, float8_e4m3fn) come with their scales, and q is then any float dtype."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v caches must be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [tokens, heads, {k_cache.shape[3]}], got {tuple(q.shape)}")
    quantized = check_scales(k_cache, k_scale, v_scale)
    if (q.dtype != k_cache.dtype and not quantized) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q and caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if q.shape[2] > 128:
        raise ValueError(f"head_dim {q.shape[2]} > 128: the tiles are sized for head dims up to 128")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous")
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two, got {block_size}")
    return q.shape[1] // k_cache.shape[2]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (tf32 would cost fp32 parity); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    plan: DecodePlan | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, Hq, D], over its paged keys; returns [B, Hq, D].

    Without a plan the split is sized for the widest context the block table can describe
    (its width times the block size), which needs no device sync. An int8 or float8_e4m3fn
    cache needs k_scale/v_scale [blocks, block_size, Hkv] (see `write_kv`).
    """
    queries_per_kv = check_paged_inputs(q, k_cache, v_cache, k_scale, v_scale)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous head dim")
    if plan is None:
        max_context = block_tables.shape[1] * block_size
        plan = plan_decode(num_seqs, num_q_heads, num_kv_heads, head_dim, max_context, q.device)
    elif (plan.num_seqs, plan.num_q_heads, plan.head_dim) != (num_seqs, num_q_heads, head_dim):
        raise ValueError("the decode plan was made for a different batch shape")
    if num_seqs == 0:
        return out

    split = plan.num_splits > 1
    scratch = (plan.partial_out, plan.partial_max, plan.partial_sum) if split else (out, out, out)
    merge = split and plan.counters is not None
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps, num_stages = _decode_tiles(q.dtype)
    quantized = k_scale is not None
    scales = (k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)) if quantized else (k_cache, v_cache, 0, 0)
    _paged_decode_kernel[(num_seqs, num_kv_heads, plan.num_splits)](
        out, q, k_cache, v_cache, *scales[:2], block_tables, context_lens, *scratch,
        plan.counters if merge else context_lens, queries_per_kv, plan.split_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scales[2:], block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(queries_per_kv)),
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        QK_SCALE=float(scale) * LOG2E,
        DOT_PRECISION=dot_precision(q.dtype),
        SPLIT=split,
        KV_QUANT=quantized,
        MERGE=merge,
        BLOCK_S=triton.next_power_of_2(plan.num_splits),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split and not merge:
        _merge_splits_kernel[(num_seqs, num_q_heads)](
            out, *scratch, context_lens, plan.split_len, plan.num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(plan.num_splits),
            num_warps=4,
        )
    return out
