"""Weight-only quantized linear layers: W4A16 (int4 weights with per-group scale and offset) and
W8A16 (int8 weights with a per-group scale), activations and outputs in fp16/bf16 (or fp32).

Packed layout (the loaders write exactly this; `edgepaged.quant.formats` holds it and its dequantisation):
- int4: `qweight` uint8 [N, K/2], byte j of row n holds k=2j in its low nibble and k=2j+1 in its
  high nibble; `scales`, `offsets` [N, K/G]; w[n, k] = q * scales[n, k/G] + offsets[n, k/G], q 0..15.
- int8: `qweight` int8 [N, K]; `scales` [N, K/G]; w[n, k] = q * scales[n, k/G].

Why two kernels. A linear layer reads its weights whatever T is: N*K/2 + 4*N*K/G bytes for int4
with fp16 scales and offsets (0.53 bytes a weight at G=128, 0.625 at G=32), N*K + 2*N*K/G for
int8, against 2*N*K for bf16; and it does 2*T*N*K FLOPs. At decode (T <= 16) that is at most 64 FLOPs per int4 byte, far below what any of
our GPUs needs to become compute-bound, so the decode kernel is shaped for bandwidth: every
weight byte is read exactly once, by one program, in long coalesced row segments, and the grid
is widened by splitting K when N alone gives too few programs (split-K). At prefill the same
bytes feed T times more work, so the prefill kernel is an ordinary tiled GEMM whose weight tile
is dequantized in registers before `tl.dot`; its cost is the tensor-core work plus the dequant
arithmetic, amortised over BLOCK_M rows of x.

Both use plain tl.load / tl.dot (no TMA, no wgmma-specific code, no fp8), so one source compiles
for sm_87 (Jetson Orin), sm_86/89 and sm_90; tests/test_quant_kernels.py builds them for sm_87
(and sm_90) on a CPU and checks for register spills. Shapes come only from tensor shapes, never
from tensor values, and there is no host sync, so every launch can be captured in a CUDA graph.
Accumulation is fp32 throughout. fp32 activations are accepted too (exact "ieee" dots, smaller
GEMM tiles), so a model run in fp32 on a GPU for parity checks can keep its weights packed.

Block sizes are fixed rules (below, with the reasoning), not autotuned: autotuning would cost
the first request of every new shape seconds of benchmarking, which an edge server answering
its first prompt cannot afford. `scripts/check_quant_gpu.py` times the rules against dense bf16
and the measured copy bandwidth: the place to start if a card wants other tiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .paged_decode import _sm_count, dot_precision

DECODE_MAX_TOKENS = 16  # T above this goes to the prefill paths
# From this T on, the weight is dequantized into a dense scratch matrix and cuBLAS runs the GEMM
# (see `_dequantized_linear`). On an H200 that beat the fused dequantizing GEMM at every T from 32
# to 1024 on the 1B shape's layers (qkv at T=32: 12 us against 46; gate_up at T=1024: 119
# against 416), since a register-dequantized operand keeps Hopper's tl.dot off its fastest
# path; so on sm_90+ it starts right after decode. Elsewhere (Ampere/Ada/Orin, not measured yet:
# there the fused GEMM's mma path is closer to cuBLAS and the extra 2.5 bytes a weight cost more
# of a Jetson's bandwidth) it starts at 128 tokens. docs/benchmarks/kernels-notes.md.
DENSE_MIN_TOKENS = {9: DECODE_MAX_TOKENS + 1}
DENSE_MIN_TOKENS_DEFAULT = 128
# int4 at G=16 (8 bytes a group) computed wrong on an H200 in the tensor-core decode path while the
# interpreter passed it; no int4 format needs it (GGUF's are 32, GPTQ/AWQ's 128), so it is refused.
_GROUP_SIZES = {4: (32, 64, 128), 8: (16, 32, 64, 128)}
# The dequantize kernel's tile: 32 rows x 256 weights (4 KiB of packed int4 over 4 warps).
_DEQUANT_ROWS, _DEQUANT_K = 32, 256
# The decode tiles, from scripts/tune_quant_gpu.py's search on an H200 (2026-12-03; every layer of
# the 1B shape, int4 g32/g128 and int8 g32; docs/benchmarks/quant-tune-h200-2026-12-03.md):
# T = 1: 4 rows x 512 bytes of packed weights per iteration, one program per 4 output features
# (N/4 programs: enough loads in flight without splitting K under 4,096 weights); 4 warps for
# int4, 8 for int8. 2 <= T <= 16: 64 rows x 128 weights per iteration, split K into 512-weight
# slices while the grid is under _PROGRAMS_PER_SM programs per SM, 2 warps (4 at G=128).
_GEMV_ROWS, _GEMV_ROW_BYTES, _GEMV_MIN_SPLIT_K = 4, 512, 4096
_DOT_ROWS, _DOT_K = 64, 128
# Split K while the N-parallel grid is under _PROGRAMS_PER_SM programs per SM (a memory-bound
# kernel needs several resident per SM to keep enough loads in flight), never into slices under
# _MIN_SPLIT_K weights (each split costs T*N*4 bytes of fp32 partials, written and read once).
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_K = 512
_MAX_SPLITS = 16


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """Integer weights from packed bytes along the last axis: for int4, the low nibble of byte j
    is element 2j and the high nibble element 2j+1 (interleave), so the last axis doubles."""
    if BITS == 4:
        return tl.interleave(packed & 0xF, packed >> 4)
    else:
        return packed


# T changes from step to step: not specialised on (as in paged_prefill.py), so one compile per
# kernel shape serves every T instead of one each for T % 16 == 0 and the rest.
@triton.jit(do_not_specialize=["num_tokens"])
def _quant_gemv_kernel(
    x_ptr,
    q_ptr,
    scales_ptr,
    offsets_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    num_tokens,
    N,
    num_groups,
    groups_per_split,
    stride_xt,
    stride_qn,
    stride_sn,
    stride_on,
    stride_ot,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_ITER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode: BLOCK_N output features x one slice of K (split `program_id(1)`), all T tokens.

    Memory traffic: each program reads its rows' packed bytes for its slice once (the whole grid
    reads the weight matrix exactly once), their scales/offsets, and the slice of x (T x slice,
    from L2: every N-program of a split reads the same x). With SPLIT, it writes fp32 partials
    [splits, T, N] that `_split_k_merge_kernel` sums; otherwise it writes the output directly.

    Per group g the kernel uses x.w = sum_g s_g (x_g . q_g) + o_g sum(x_g): the integer weights
    meet x unscaled (exact in fp16/bf16), and scale and offset are applied once per group to the
    partial dot product instead of once per weight.

    BLOCK_T == 1 (batch-1 decode) runs on the FMA units: the tile is [BLOCK_N, GROUPS_PER_ITER,
    GROUP] so a row's GROUPS_PER_ITER groups are one contiguous run of bytes (coalesced, 16-byte
    vectors) while each group still reduces on its own. 2 <= T <= 16 pads the tokens to 16 rows
    and uses tl.dot per group (the FMA units cannot keep up with 16 rows at full bandwidth).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    q_rows = q_ptr + offs_n.to(tl.int64) * stride_qn
    s_rows = scales_ptr + offs_n.to(tl.int64) * stride_sn
    o_rows = offsets_ptr + offs_n.to(tl.int64) * stride_on
    g_start = pid_s * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    GROUP_BYTES: tl.constexpr = GROUP * BITS // 8
    offs_e = tl.arange(0, GROUP)
    offs_b = tl.arange(0, GROUP_BYTES)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens

    if BLOCK_T == 1:
        offs_gi = tl.arange(0, GROUPS_PER_ITER)
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(g_start, g_end, GROUPS_PER_ITER):
            gs = g0 + offs_gi
            g_mask = gs < g_end
            w_mask = n_mask[:, None] & g_mask[None, :]
            packed = tl.load(
                q_rows[:, None, None] + gs[None, :, None] * GROUP_BYTES + offs_b[None, None, :],
                mask=w_mask[:, :, None],
                other=0,
            )
            q = _unpack(packed, BITS).to(tl.float32)  # [BLOCK_N, GROUPS_PER_ITER, GROUP]
            x = tl.load(x_ptr + gs[:, None] * GROUP + offs_e[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
            dots = tl.sum(q * x[None, :, :], axis=2)  # [BLOCK_N, GROUPS_PER_ITER]
            s = tl.load(s_rows[:, None] + gs[None, :], mask=w_mask, other=0.0).to(tl.float32)
            part = dots * s
            if HAS_OFFSETS:
                o = tl.load(o_rows[:, None] + gs[None, :], mask=w_mask, other=0.0).to(tl.float32)
                part += o * tl.sum(x, axis=1)[None, :]
            acc1 += tl.sum(part, axis=1)
        acc = acc1[None, :]
    else:
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for g0 in range(g_start, g_end, GROUPS_PER_ITER):
            for i in tl.static_range(GROUPS_PER_ITER):  # independent loads: more bytes in flight
                g = g0 + i
                g_ok = g < g_end
                packed = tl.load(q_rows[:, None] + g * GROUP_BYTES + offs_b[None, :], mask=n_mask[:, None] & g_ok, other=0)
                x = tl.load(x_rows + g * GROUP + offs_e[None, :], mask=t_mask[:, None] & g_ok, other=0.0)
                q = _unpack(packed, BITS).to(x.dtype)  # [BLOCK_N, GROUP], exact: |q| <= 128
                dots = tl.dot(x, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_N], fp32
                s = tl.load(s_rows + g, mask=n_mask & g_ok, other=0.0).to(tl.float32)
                acc += dots * s[None, :]
                if HAS_OFFSETS:
                    o = tl.load(o_rows + g, mask=n_mask & g_ok, other=0.0).to(tl.float32)
                    acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * o[None, :]

    out_mask = t_mask[:, None] & n_mask[None, :]
    if SPLIT:
        rows = (pid_s * num_tokens + offs_t).to(tl.int64)
        tl.store(partial_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _split_k_merge_kernel(partial_ptr, bias_ptr, out_ptr, num_tokens, N, num_splits, stride_ot,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, n] = sum over splits of partial[s, t, n] (+ bias[n]), in a fixed order (so results
    do not depend on scheduling, unlike atomics). Traffic: splits x T x N x 4 bytes, from L2."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(partial_ptr + (s * num_tokens + t) * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _quant_gemm_kernel(
    x_ptr,
    q_ptr,
    scales_ptr,
    offsets_ptr,
    bias_ptr,
    out_ptr,
    num_tokens,
    N,
    K,
    stride_xt,
    stride_qn,
    stride_sn,
    stride_on,
    stride_ot,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Prefill: a [BLOCK_M, BLOCK_N] output tile over the whole of K, the weight tile
    dequantized in registers (w = q * s + o, rounded once to x's dtype) and fed to tl.dot.

    BLOCK_K divides the quantization group, so a K tile lies in one group and its scales and
    offsets are one [BLOCK_N] vector each, broadcast along K. Dequantizing before the dot (rather
    than scaling the accumulator per group, as the decode kernel does) keeps one accumulator
    tile in registers, which the per-group form would double. Programs walk the output in
    GROUP_M-row bands so the weight tiles a band shares are still in L2 for its next row tile.
    Memory traffic: x once per N tile, weights once per M tile (mostly from L2), output once.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(num_tokens, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < num_tokens
    n_mask = offs_n < N
    BLOCK_BYTES: tl.constexpr = BLOCK_K * BITS // 8
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt + tl.arange(0, BLOCK_K)[None, :]
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + tl.arange(0, BLOCK_BYTES)[None, :]
    s_rows = scales_ptr + offs_n.to(tl.int64) * stride_sn
    o_rows = offsets_ptr + offs_n.to(tl.int64) * stride_on

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        packed = tl.load(q_ptrs, mask=n_mask[:, None], other=0)
        g = k0 // GROUP
        s = tl.load(s_rows + g, mask=n_mask, other=0.0).to(tl.float32)
        w = _unpack(packed, BITS).to(tl.float32) * s[:, None]
        if HAS_OFFSETS:
            w += tl.load(o_rows + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_BYTES

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(
    q_ptr, scales_ptr, offsets_ptr, w_ptr, N, num_groups,
    stride_qn, stride_sn, stride_on, stride_wn,
    BITS: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_ITER: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
):
    """w[n, k] = q[n, k] * s[n, k/G] (+ o[n, k/G]) for a [BLOCK_N, GROUPS_PER_ITER * GROUP] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.program_id(1) * GROUPS_PER_ITER + tl.arange(0, GROUPS_PER_ITER)
    GROUP_BYTES: tl.constexpr = GROUP * BITS // 8
    mask = (offs_n < N)[:, None] & (gs < num_groups)[None, :]
    rows = offs_n.to(tl.int64)
    packed = tl.load(
        q_ptr + rows[:, None, None] * stride_qn + gs[None, :, None] * GROUP_BYTES + tl.arange(0, GROUP_BYTES)[None, None, :],
        mask=mask[:, :, None], other=0,
    )
    s = tl.load(scales_ptr + rows[:, None] * stride_sn + gs[None, :], mask=mask, other=0.0).to(tl.float32)
    w = _unpack(packed, BITS).to(tl.float32) * s[:, :, None]
    if HAS_OFFSETS:
        w += tl.load(offsets_ptr + rows[:, None] * stride_on + gs[None, :], mask=mask, other=0.0).to(tl.float32)[:, :, None]
    cols = gs[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    tl.store(w_ptr + rows[:, None, None] * stride_wn + cols, w.to(w_ptr.dtype.element_ty), mask=mask[:, :, None])


class QuantDecodePlan(NamedTuple):
    block_t: int  # 1: the FMA path; 16: tokens padded to one tl.dot tile
    block_n: int  # output features per program
    groups_per_iter: int  # quantization groups a program loads per loop iteration
    groups_per_split: int  # groups in each K slice
    splits: int  # K slices (programs along grid axis 1); > 1 adds the merge kernel
    num_warps: int = 4
    num_stages: int = 2


def plan_quant_decode(
    num_tokens: int,
    n: int,
    k: int,
    group_size: int,
    bits: int,
    device: torch.device | str,
    split_k: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> QuantDecodePlan:
    """Tiles and K split of a decode launch (1 <= T <= 16). Splits K only while the N-parallel
    grid has fewer than _PROGRAMS_PER_SM programs per SM, never into slices under _MIN_SPLIT_K
    weights (4,096 at T = 1): an H200 (132 SMs) cuts the 1B shape's down projection (K=8192) in 2
    at T=1 and its K=2048 layers in 3-4 at T=16; an Orin (8-16 SMs) rarely splits. `split_k` forces the count (tests); slices are whole
    iterations where they can be, so the count may come out lower."""
    fp32 = dtype == torch.float32
    if num_tokens == 1:
        block_t, block_n, min_split = 1, _GEMV_ROWS, _GEMV_MIN_SPLIT_K
        groups_per_iter = max(1, _GEMV_ROW_BYTES * 8 // bits // group_size)
        num_warps, num_stages = (4 if bits == 4 else 8), 2
    else:  # fp32 dots run on the FMA units, operands in registers: 16 rows and 8 warps
        block_t, block_n, min_split = 16, 16 if fp32 else _DOT_ROWS, _MIN_SPLIT_K
        groups_per_iter = max(1, _DOT_K // group_size)
        num_warps, num_stages = (8 if fp32 else 2 if group_size <= 32 else 4), 3
    num_groups = k // group_size
    if split_k is None:
        wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(torch.device(device)), triton.cdiv(n, block_n))
        split_k = max(1, min(wanted, k // min_split, _MAX_SPLITS))
    groups_per_split = triton.cdiv(num_groups, max(1, min(split_k, num_groups)))
    if groups_per_split >= groups_per_iter:
        groups_per_split = triton.cdiv(groups_per_split, groups_per_iter) * groups_per_iter
    splits = triton.cdiv(num_groups, groups_per_split)
    return QuantDecodePlan(block_t, block_n, groups_per_iter, groups_per_split, splits, num_warps, num_stages)


def _check(x, qweight, scales, offsets, group_size, bias, bits) -> tuple[int, int]:
    """Validate shapes and dtypes (metadata only, no device sync); returns (N, K)."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(1) != 1:
        raise ValueError(f"x must be [T, K] fp16/bf16/fp32 with a contiguous last dim, got {tuple(x.shape)} {x.dtype}")
    if group_size not in _GROUP_SIZES[bits]:
        raise ValueError(f"int{bits} group_size must be one of {_GROUP_SIZES[bits]}, got {group_size}")
    k = x.shape[1]
    if k % group_size or k == 0:
        raise ValueError(f"K={k} is not a positive multiple of group_size={group_size}")
    n = qweight.shape[0]
    packed_dtype = torch.uint8 if bits == 4 else torch.int8
    if qweight.dim() != 2 or qweight.shape[1] != k * bits // 8 or qweight.dtype != packed_dtype or qweight.stride(1) != 1:
        raise ValueError(
            f"qweight must be {packed_dtype} [N, {k * bits // 8}] (K={k}, {bits}-bit) with a contiguous last dim, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and (t.shape != (n, k // group_size) or t.stride(1) != 1 or not t.is_floating_point()):
            raise ValueError(f"{name} must be float [{n}, {k // group_size}], got {t.dtype} {tuple(t.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return n, k


def _quant_linear(x, qweight, scales, offsets, group_size, bias, bits, split_k, plan=None):
    """Dispatch by T: the decode kernel up to DECODE_MAX_TOKENS, the dequantizing GEMM below
    `dense_min_tokens`, and from there the weight dequantized once into a dense scratch matrix
    for cuBLAS (see `_dequantized_linear`). `plan` overrides the decode rules (the tuner)."""
    n, k = _check(x, qweight, scales, offsets, group_size, bias, bits)
    num_tokens = x.shape[0]
    if num_tokens >= dense_min_tokens(x.device):
        return _dequantized_linear(x, qweight, scales, offsets, group_size, bias, bits)
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or n == 0:
        return out
    has_offsets = offsets is not None
    offsets_arg = offsets if has_offsets else scales  # never read
    bias_arg = bias if bias is not None else out  # never read
    common = dict(BITS=bits, GROUP=group_size, HAS_OFFSETS=has_offsets, DOT_PRECISION=dot_precision(x.dtype))
    strides = (x.stride(0), qweight.stride(0), scales.stride(0), offsets_arg.stride(0), out.stride(0))

    if num_tokens > DECODE_MAX_TOKENS:
        # 64 x 128 tiles: a 32 KiB fp32 accumulator over 4 warps, and with 3 stages 12-57 KiB of
        # shared memory (sm_87/sm_90 builds), under the 99 KiB an sm_86 block may use. BLOCK_K
        # <= 64 divides the group. fp32 activations (exact fp32 dots on the FMA units, for
        # parity runs) take 32 x 64 x 32 tiles to stay clear of spills.
        wide = x.dtype != torch.float32
        block_m = min(64 if wide else 32, triton.next_power_of_2(num_tokens))
        block_n = min(128 if wide else 64, max(16, triton.next_power_of_2(n)))
        block_k = min(group_size, 64 if wide else 32)
        grid = (triton.cdiv(num_tokens, block_m) * triton.cdiv(n, block_n),)
        _quant_gemm_kernel[grid](
            x, qweight, scales, offsets_arg, bias_arg, out,
            num_tokens, n, k, *strides,
            **common,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            num_warps=4,
            num_stages=3,
        )
        return out

    if plan is None:
        plan = plan_quant_decode(num_tokens, n, k, group_size, bits, x.device, split_k, x.dtype)
    splits = plan.splits
    partial = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    _quant_gemv_kernel[(triton.cdiv(n, plan.block_n), splits)](
        x, qweight, scales, offsets_arg, bias_arg, out, partial,
        num_tokens, n, k // group_size, plan.groups_per_split, *strides,
        **common,
        GROUPS_PER_ITER=plan.groups_per_iter,
        BLOCK_N=plan.block_n,
        BLOCK_T=plan.block_t,
        HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    if splits > 1:
        merge_n = min(1024, triton.next_power_of_2(n))
        _split_k_merge_kernel[(num_tokens, triton.cdiv(n, merge_n))](
            partial, bias_arg, out, num_tokens, n, splits, out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_N=merge_n,
            num_warps=4,
        )
    return out


def dense_min_tokens(device: torch.device) -> int:
    """The T from which a prefill dequantizes for cuBLAS on this device (see DENSE_MIN_TOKENS)."""
    if device.type != "cuda":
        return DENSE_MIN_TOKENS_DEFAULT
    return DENSE_MIN_TOKENS.get(_capability_major(device), DENSE_MIN_TOKENS_DEFAULT)


@functools.cache
def _capability_major(device: torch.device) -> int:
    return min(9, torch.cuda.get_device_capability(device)[0])


def dequantize(qweight, scales, offsets, group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight as a dense [N, K] matrix in `dtype` (one pass: reads the packed bytes
    and scales once, writes 2 or 4 bytes a weight)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    has_offsets = offsets is not None
    offsets_arg = offsets if has_offsets else scales  # never read
    # fp32 output holds twice the bytes per weight in registers: half the tile (no spills on sm_87).
    groups_per_iter = max(1, _DEQUANT_K // (2 if dtype == torch.float32 else 1) // group_size)
    grid = (triton.cdiv(n, _DEQUANT_ROWS), triton.cdiv(k // group_size, groups_per_iter))
    _dequantize_kernel[grid](
        qweight, scales, offsets_arg, w, n, k // group_size,
        qweight.stride(0), scales.stride(0), offsets_arg.stride(0), w.stride(0),
        BITS=bits, GROUP=group_size, GROUPS_PER_ITER=groups_per_iter, BLOCK_N=_DEQUANT_ROWS,
        HAS_OFFSETS=has_offsets, num_warps=4,
    )
    return w


def _dequantized_linear(x, qweight, scales, offsets, group_size, bias, bits):
    """Prefill of many tokens: dequantize the weight into a scratch matrix in x's dtype, then
    cuBLAS. The extra traffic (about 2.5 bytes a weight for int4) is paid once per call and
    amortised over T rows, while cuBLAS's tensor-core GEMM is several times faster than the
    fused dequantizing GEMM at large T. The scratch matrix is a transient allocation, so the
    memory profiler's run at the largest batch measures it in the activation peak."""
    w = dequantize(qweight, scales, offsets, group_size, bits, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [T, K] fp16/bf16 times the int4 weight (uint8 [N, K/2], scales/offsets [N, K/G]) -> [T, N]
    in x's dtype (fp32 x also works, with exact fp32 dots: slow, for parity runs). T <= 16 runs the decode kernel, larger T the dequantizing GEMM. `split_k`
    forces the decode kernel's number of K slices (tests); None picks it from the SM count."""
    return _quant_linear(x, qweight, scales, offsets, group_size, bias, 4, split_k)


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [T, K] fp16/bf16 times the int8 weight (int8 [N, K], scales [N, K/G]) -> [T, N] in x's
    dtype; dispatch as in `w4a16_linear`."""
    return _quant_linear(x, qweight, scales, None, group_size, bias, 8, split_k)
