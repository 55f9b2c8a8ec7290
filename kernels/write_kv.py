"""Scatter this step's keys and values into their cache slots.

One program per token moves that token's [kv_heads, head_dim] rows for K and V; the head dim is
contiguous on both sides, so loads and stores are full-width. key/value may be strided views of
a fused QKV projection: only their head dim has to be contiguous. A negative slot (a padded
token of a captured batch) is skipped, so padding never touches a live block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgepaged.attention import KV_MAX_SCALE, KV_MIN_SCALE, KV_QMAX, KV_SCALE_DTYPE


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(k_dst, k, mask=mask)
    tl.store(v_dst, v, mask=mask)


# The format is `edgepaged.attention.quantize_kv`'s: scales clamped to fp16's finite range, the
# smallest subnormal up (an all-zero row then gets codes 0, not 0/0).
_MIN_SCALE = tl.constexpr(KV_MIN_SCALE)
_MAX_SCALE = tl.constexpr(KV_MAX_SCALE)


@triton.jit
def _quantize_store(x, dst, scale_dst, mask, head_ok, QMAX: tl.constexpr, INT_CODES: tl.constexpr):
    """Rows x [BLOCK_H, BLOCK_D] (fp32, masked lanes 0) as 8-bit codes at `dst` and one fp16
    scale per row at `scale_dst`. Divisions are correctly rounded (div_rn), not the GPU's
    approximate ones, so the codes equal the torch reference's bit for bit."""
    absmax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32))
    scale = tl.minimum(tl.maximum(scale, _MIN_SCALE), _MAX_SCALE).to(tl.float16)
    y = tl.math.div_rn(x, scale.to(tl.float32)[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if INT_CODES:
        codes = tl.floor(y + 0.5).to(tl.int8)
    else:
        codes = y.to(dst.dtype.element_ty)
    tl.store(dst, codes, mask=mask)
    tl.store(scale_dst, scale, mask=head_ok)


@triton.jit
def _write_kv_quant_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_sb,
    stride_ss,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QMAX: tl.constexpr,
    INT_CODES: tl.constexpr,
):
    """As `_write_kv_kernel`, quantizing each (token, head) row; K and V scales share strides
    [blocks, block_size, heads] with the head contiguous."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head_ok = offs_h < NUM_KV_HEADS
    mask = head_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    scale_offset = block * stride_sb + offset * stride_ss + offs_h
    _quantize_store(k.to(tl.float32), k_dst, k_scale_ptr + scale_offset, mask, head_ok, QMAX, INT_CODES)
    _quantize_store(v.to(tl.float32), v_dst, v_scale_ptr + scale_offset, mask, head_ok, QMAX, INT_CODES)


def check_scales(cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether `cache` is an 8-bit pool; if it is, its scales must be fp16 [blocks, block_size,
    heads] with the head contiguous and K and V laid out alike (the kernels share one stride)."""
    if cache.dtype not in KV_QMAX:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"scales are for an int8 or fp8 cache, not {cache.dtype}")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError(f"a {cache.dtype} cache needs its k_scale and v_scale")
    for scale in (k_scale, v_scale):
        if scale.shape != cache.shape[:3] or scale.dtype != KV_SCALE_DTYPE or scale.stride(2) != 1:
            raise ValueError(
                f"scales must be float16 {tuple(cache.shape[:3])} with the head contiguous, got "
                f"{scale.dtype} {tuple(scale.shape)}"
            )
    if k_scale.stride() != v_scale.stride():
        raise ValueError("k_scale and v_scale must share strides")
    return True


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """key/value [T, Hkv, D] into k_cache/v_cache [blocks, block_size, Hkv, D] at
    slot = block * block_size + offset, one slot per token (int32 or int64).

    For an int8 or float8_e4m3fn cache, k_scale/v_scale [blocks, block_size, Hkv] (float16)
    receive each row's scale and the cache its codes (see `edgepaged.attention.quantize_kv`)."""
    if key.shape != value.shape or key.dim() != 3 or key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key/value {tuple(key.shape)} do not match cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError("k and v caches differ in shape")
    quantized = check_scales(k_cache, k_scale, v_scale)
    if not key.dtype == value.dtype or k_cache.dtype != v_cache.dtype or (not quantized and key.dtype != k_cache.dtype):
        raise ValueError("key, value and caches must share a dtype")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if quantized:
        _write_kv_quant_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_scale.stride(0), k_scale.stride(1),
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_SIZE=k_cache.shape[1],
            QMAX=KV_QMAX[k_cache.dtype],
            INT_CODES=k_cache.dtype == torch.int8,
            num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
        )
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )
