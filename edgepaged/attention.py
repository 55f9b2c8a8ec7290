"""The one interface every attention backend implements.

The model runner describes a step once (`AttentionBatch`); a backend derives whatever it needs
from it once per step (`prepare`), so the per-layer `forward` does no host work. Keeping the
description in plain tensors is what lets the torch reference, the Triton kernels and the
TensorRT plugin share one scheduler and one model.

The KV pools are in the model's dtype, or in 8 bits (`kv_cache.dtype: int8 | fp8_e4m3`), where a
layer's pool reaches the backend as a `QuantizedCache` and `quantize_kv`/`dequantize_kv` define
the format every backend and kernel follows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionBatch:
    """One scheduler step, flattened: the decode tokens first, then the prefill chunks.

    All tensors live on the model's device. Decode sequence `i` owns token row `i`; prefill
    chunk `j` owns rows `num_decode_tokens + prefill_query_start_loc[j]` up to the next start.
    `*_context_lens` count the keys each sequence attends to after this step's K/V is written.
    """

    slot_mapping: torch.Tensor  # int64 [T]
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # int32 [num_decode_tokens, max_blocks]
    decode_context_lens: torch.Tensor  # int32 [num_decode_tokens]
    max_decode_context_len: int
    prefill_block_tables: torch.Tensor  # int32 [num_prefills, max_blocks]
    prefill_query_start_loc: torch.Tensor  # int32 [num_prefills + 1], relative to the prefill rows
    prefill_context_lens: torch.Tensor  # int32 [num_prefills]
    max_prefill_query_len: int
    max_prefill_context_len: int
    block_size: int

    @property
    def num_prefills(self) -> int:
        return self.prefill_context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


# `kv_cache.dtype` names of the 8-bit pools, and the largest magnitude each stores.
KV_QUANT_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# fp16, not fp32: at head dim 64 a 4-byte scale would cost 6% of an int8 token (68 vs 66 bytes
# per head), and the pool would hold 1.88x, not 1.94x, the tokens of a 16-bit one. fp16's 11-bit
# mantissa is far finer than the 8-bit codes it scales.
KV_SCALE_DTYPE = torch.float16
KV_MIN_SCALE = 2.0**-24  # fp16's smallest subnormal: an all-zero row gets codes 0, never 0/0
KV_MAX_SCALE = 65504.0  # fp16's largest finite value


@dataclass(frozen=True, slots=True)
class QuantizedCache:
    """One layer's K (or V) pool in 8 bits, with one scale per (slot, KV head).

    Per-token-per-head scales are what a paged cache wants: each written token sets its own
    scale from its own values, so nothing is recalibrated when a block is shared by a prefix hit
    or copied for copy-on-write, and an outlier token costs only its own precision. The scales
    are a parallel paged tensor indexed by the same slot (`scale.view(-1, Hkv)[slot]`), so
    whatever moves a block's data moves its scales with it.
    """

    data: torch.Tensor  # int8 or float8_e4m3fn [num_blocks, block_size, num_kv_heads, head_dim]
    scale: torch.Tensor  # KV_SCALE_DTYPE [num_blocks, block_size, num_kv_heads]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] as (codes of `dtype`, KV_SCALE_DTYPE scales [...]): the absmax of each
    row over KV_QMAX, rounded to fp16 first so that codes and dequantization use the same scale.

    int8 codes are floor(y + 0.5) (halves round up), which the write kernel computes with the
    same correctly rounded divisions, so the kernel and this reference agree bit for bit. fp8
    codes are clamped to +-448 before the cast (e4m3fn has no infinity).

    Both divisions are tensor by tensor on x's device: on CUDA, torch divides by a Python (CPU)
    scalar as a multiplication by its rounded reciprocal, one fp32 ulp off the quotient, and
    that ulp changes the fp16 scale wherever the quotient sits next to an fp16 rounding
    boundary (fp32 inputs, seen for absmax / 448 on an H200).
    """
    qmax = KV_QMAX[dtype]
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (absmax / torch.full_like(absmax, qmax)).clamp(KV_MIN_SCALE, KV_MAX_SCALE).to(KV_SCALE_DTYPE)
    y = (xf / scale.float()).clamp(-qmax, qmax)
    codes = torch.floor(y + 0.5).to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, scale.squeeze(-1)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim] times their scales [...], in `dtype`."""
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


class AttentionBackend(ABC):
    """Paged attention over one layer's K/V pools.

    `kv_dtype` is the pools' element type: None for the model's dtype, or one of
    KV_QUANT_DTYPES' values, in which case `forward` receives each pool as a `QuantizedCache`.
    """

    name: str
    # Whether `attend_written` exists: attention over decode rows whose K/V a fused projection
    # already wrote into the pools (kernels/decode_gemv.py's ROPE_KV epilogue). Such a backend's
    # prepared state carries the step's AttentionBatch as `.batch` (the projection reads its slots).
    attends_written_kv: bool = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, kv_dtype: torch.dtype | None = None
    ):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        if kv_dtype is not None and kv_dtype not in KV_QMAX:
            raise ValueError(f"an 8-bit KV pool is int8 or float8_e4m3fn, got {kv_dtype}")
        self.kv_dtype = kv_dtype

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any:
        """Derive the per-step state every layer reuses (gather indices, masks, split plans)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor | QuantizedCache,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor | QuantizedCache,
        prepared: Any,
    ) -> torch.Tensor:
        """Write this step's K/V into their slots, then attend; returns [T, num_heads, head_dim]."""

    def attend_written(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: Any
    ) -> torch.Tensor:
        """Decode attention of q [T, Hq, D] (one token per sequence, no prefill rows) over pools
        that already hold this step's K/V; only where `attends_written_kv`."""
        raise NotImplementedError(f"the {self.name} backend writes K/V itself (see attends_written_kv)")
