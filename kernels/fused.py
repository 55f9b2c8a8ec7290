"""Fused elementwise kernels for the decoder layer: residual add + RMSNorm, rotary embedding,
SiLU-and-multiply.

At batch-1 decode the GPU time of a small model goes mostly to launching dozens of tiny
elementwise kernels per layer; each of these replaces a chain of them with one launch. The
arithmetic follows the PyTorch model code step by step, rounding to the tensor dtype wherever
an eager op would, so fp16/bf16 results stay within an ulp or so of the unfused path. Shapes
come only from tensor shapes, never from tensor values, so every launch can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(elements: int) -> int:
    """Enough warps that each thread handles a handful of elements, no more."""
    return max(1, min(16, triton.next_power_of_2(elements) // 256))


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=0) / HIDDEN
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for x/residual [T, hidden]; with no
    residual, the sum is x itself and comes back as is (the first layer's input)."""
    if x.dim() != 2 or x.shape[1:] != weight.shape or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} must be [T, {weight.shape[0]}] with a contiguous last dim")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError("residual must match x in shape and dtype, last dim contiguous")
    num_tokens, hidden = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out, residual_out
    source = x if residual is None else residual
    _add_rms_norm_kernel[(num_tokens,)](
        x, source, weight, out, residual_out,
        x.stride(0), source.stride(0), out.stride(0), residual_out.stride(0),
        eps,
        HIDDEN=hidden,
        BLOCK=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None,
        num_warps=_warps(hidden),
    )
    return out, residual_out


@triton.jit
def _rotate_heads(base_ptr, stride_h, cos1, cos2, sin1, sin2, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate-half rope of one token's heads in place: [x1, x2] -> [x1*c - x2*s, x2*c + x1*s],
    each product rounded to the storage dtype as the eager ops round it."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    ptr1 = base_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = (x1.to(tl.float32) * cos1).to(dtype).to(tl.float32)
    b1 = (x2.to(tl.float32) * sin1).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos2).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin2).to(dtype).to(tl.float32)
    tl.store(ptr1, (a1 - b1).to(dtype), mask=mask)
    tl.store(ptr1 + HALF, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    # Both halves of the tables are read: they are equal for every rope variant in use, but the
    # kernel should not be the place that assumes it.
    cos_row = cos_ptr + pos * stride_table + offs_d
    sin_row = sin_ptr + pos * stride_table + offs_d
    cos1 = tl.load(cos_row, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + HALF, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + HALF, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos1, cos2, sin1, sin2, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos1, cos2, sin1, sin2, NUM_KV_HEADS, HALF, BLOCK_KH,
                  BLOCK_HALF)


def rotary_embedding_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the rows `positions` [T] of the tables
    cos/sin [max_positions, D]. q and k may be strided views (of a fused QKV output); only
    their head dim has to be contiguous. Tables must share q's dtype, as the eager path's do."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, D] alike")
    head_dim = q.shape[2]
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"tables {tuple(cos.shape)} must be [max_positions, {head_dim}], head dim even")
    if not q.dtype == k.dtype == cos.dtype == sin.dtype:
        raise ValueError("q, k and the tables must share a dtype")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or cos.stride() != sin.stride():
        raise ValueError("head dims and table rows must be contiguous, the two tables laid out alike")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=_warps(num_q_heads * half),
    )


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + INTERMEDIATE + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] holding gate then up along the last dim: [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be [T, 2I] with a contiguous last dim")
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), out.stride(0),
        INTERMEDIATE=intermediate,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return out
