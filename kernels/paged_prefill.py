"""Paged prefill attention: a chunk of queries against its cached prefix and itself, causally.

This is the kernel that makes prefix hits and chunked prefill pay off: the chunk's queries read
the prefix straight from the paged cache instead of recomputing it. A program owns a tile of
one sequence's queries for one KV head, with the rows of all query heads sharing that KV head
packed together (row r is token r // G, head r % G), so every K/V tile fetched through the
block table feeds BLOCK_M rows of a tensor-core dot. Keys wholly before the tile's first query
need no mask; only the one or two tiles on the diagonal pay for the causal mask.

Launch contract as for decode: pointers, integers and compile-time constants only. 8-bit pools
(int8 / fp8 e4m3 with per-(slot, head) scales) go through `_paged_prefill_quant_kernel`, the same
program with KV_QUANT set (tiles dequantized in registers, see `attend_tile`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_decode import LOG2E, attend_tile, check_paged_inputs, dot_precision


@triton.jit
def _prefill_program(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    queries_per_kv,
    block_q,
    stride_qt,
    stride_qh,
    stride_ot,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    """One program of the grid (sequence, query tile, KV head); a tile holds `block_q` tokens x
    G heads <= BLOCK_M rows. Tiles past a sequence's chunk return at once, so the grid can be
    sized by the longest chunk without a device sync. KV_QUANT reads 8-bit pools and their
    scales (see `attend_tile`)."""
    seq = tl.program_id(0)
    # Later tiles see more keys; handing them out first shortens the tail of the launch.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first = tile * block_q
    if first >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    token = first + offs_m // queries_per_kv
    head = kv_head * queries_per_kv + offs_m % queries_per_kv
    row_ok = (offs_m < block_q * queries_per_kv) & (token < q_len)
    q_pos = context_len - q_len + token
    row_offset = (q_start + token).to(tl.int64)
    io_mask = row_ok[:, None] & d_mask[None, :]
    q_ptrs = q_ptr + row_offset[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = kv_head.to(tl.int64) * stride_kh
    v_head = kv_head.to(tl.int64) * stride_vh
    # Every row sees all keys before the tile's first query; the rest is the causal diagonal.
    first_pos = context_len - q_len + first
    key_end = context_len - q_len + tl.minimum(first + block_q, q_len)
    full_end = first_pos // BLOCK_N * BLOCK_N
    for n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, k_head, v_head,
            kv_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, n, key_end, q_pos, offs_d, d_mask,
            False, False, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, KV_QUANT,
        )
    for n in range(full_end, key_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, k_head, v_head,
            kv_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, n, key_end, q_pos, offs_d, d_mask,
            True, True, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, KV_QUANT,
        )

    # Every row sees key 0 (its position is >= 0), so l_i > 0 and m_i is finite here.
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + row_offset[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


# The block-table width changes from step to step: specialised on (its divisibility by 16),
# every new width class would compile the kernel again in the middle of serving (~0.6 s, seen
# as the first burst's TTFT on an H200). The 16-bit entry keeps the parameter list the TensorRT
# plugin compiles it by (ahead of time, by name); the 8-bit one adds the scales.
# The step's prefill rows follow its decode rows, so the backend passes the per-sequence arrays
# as slices `[num_decodes:]`: their start's 16-byte alignment changes with the number of decodes
# and the table width. Specialised on it, a live burst compiled a variant warm-up had not (about
# a second of a first burst's latency, H200); these are a few scalar loads a program, where the
# alignment hint buys nothing.
_SLICED = ["block_tables_ptr", "query_start_loc_ptr", "context_lens_ptr"]


@triton.jit(do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=_SLICED)
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    queries_per_kv,
    block_q,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    _prefill_program(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr,
        context_lens_ptr, queries_per_kv, block_q, stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, 0, 0, stride_bt,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, False,
    )


@triton.jit(do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=_SLICED)
def _paged_prefill_quant_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    queries_per_kv,
    block_q,
    stride_qt,
    stride_qh,
    stride_ot,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    _prefill_program(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, query_start_loc_ptr,
        context_lens_ptr, queries_per_kv, block_q, stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_sb, stride_ss, stride_bt,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_SIZE, QK_SCALE, DOT_PRECISION, True,
    )


def _tile_shape(head_dim: int, dtype: torch.dtype, quantized: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), checked for spills and shared memory in the
    sm_86, sm_87 and sm_90 cubins: 16-bit 64x64 tiles (64x32 for head dim 128) with two
    pipeline stages stay under the 99 KB of consumer Ampere; fp32 dots run on FMA units, so
    smaller tiles over more warps, and over an 8-bit pool (whose converted tiles take registers
    too) one pipeline stage, which keeps sm_87 clear of spills at head dim 128."""
    if dtype == torch.float32:
        return (32, 16, 8, 1) if quantized else (32, 16, 8, 2)
    return (64, 64, 4, 2) if head_dim <= 64 else (64, 32, 4, 2)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of prefill chunks, q [T, Hq, D] with sequence s owning rows
    query_start_loc[s]:query_start_loc[s+1]; returns [T, Hq, D].

    Query i of a chunk of n sits at position context_lens[s] - n + i and sees every key at or
    before it. `max_query_len` only sizes the grid; without it the grid assumes one sequence
    could own all T rows, which needs no device sync. An int8 or float8_e4m3fn cache needs
    k_scale/v_scale [blocks, block_size, Hkv] (see `write_kv`).
    """
    queries_per_kv = check_paged_inputs(q, k_cache, v_cache, k_scale, v_scale)
    num_tokens, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous head dim")
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError("query_start_loc needs one more entry than context_lens")
    max_query_len = num_tokens if max_query_len is None else max_query_len
    if num_seqs == 0 or max_query_len == 0:
        return out

    block_m, block_n, num_warps, num_stages = _tile_shape(head_dim, q.dtype, k_scale is not None)
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    quantized = k_scale is not None
    kernel = _paged_prefill_quant_kernel if quantized else _paged_prefill_kernel
    scale_ptrs, scale_strides = ((k_scale, v_scale), (k_scale.stride(0), k_scale.stride(1))) if quantized else ((), ())
    kernel[(num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)](
        out, q, k_cache, v_cache, *scale_ptrs, block_tables, query_start_loc, context_lens,
        queries_per_kv, block_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scale_strides, block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        QK_SCALE=float(scale) * LOG2E,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
