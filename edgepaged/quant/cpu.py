"""The CPU matmuls of packed weights: PyTorch's own int4 and int8 weight-only kernels.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros)` is the fast one
here (AVX-512/AVX2, bfloat16 activations; its float32 path is not vectorised and is 20-30x
slower). So every weight here computes in `compute_dtype` (bfloat16) and its `linear` returns
x's own dtype: a caller that keeps its activations in bfloat16 between the matmuls (the CPU
decoder, models/llama.py) pays no conversion around them, and a float32 caller gets float32
back. Its conventions, checked empirically on torch 2.13 (tests/test_quant.py keeps them
checked):

- weights are repacked by `_convert_weight_to_int4pack_for_cpu` from int32 [N, K] values 0..15
  into uint8 [N, K/2], in blocks of 64 rows: block b is [K, 32] bytes, byte (k, j) holding row
  64b+j in its low nibble and 64b+32+j in its high one; a last block of B < 64 rows (N must be
  a multiple of 16) is [K, B/2] bytes, byte (k, j) holding rows 2j (low) and 2j+1 (high);
- `scales_and_zeros` is [K/G, N, 2] in x's dtype and w = (q - 8) * scale + zero, so
  zero = offset + 8 * scale; G in {32, 64, 128, 256}.

int8 weights with groups of 32+ run as one int4 matmul over 2K columns, the high nibble plane
of u = q + 128 = 16 hi + lo beside the low one, and x beside itself: w = s q = (hi - 8) 16s +
(lo - 8) s + 8s, an exact split (the two planes are the int8 byte, stored once), each plane's
groups with their own scale and zero. One matmul, not one per plane: the planes share one
float32 accumulator (one bfloat16 rounding of the sum) and the step one kernel launch fewer. Groups of 16 (Q6_K), which the int4 kernel does not take, run as
one int4 matmul over 2K columns in groups of 32: each group of 16 becomes its 16 low nibbles
then its 16 high nibbles of u = q + 136, and x its 16 values then 16 times them, so a group's
sum is s (sum (lo - 8) x + sum (hi - 8) 16x) = s sum (u - 136) x = s sum q x with a zero of 0:
exact wherever q + 136 fits a byte (Q6_K's q is -32..31), in the int8 bytes' room, and 3-6x
faster than one `_weight_int8pack_mm` per group of 16 (docs/benchmarks/q6k-cpu-2026-12-03.md).

Nothing here keeps the shared layout beside the CPU one: each weight is repacked and the
source dropped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .formats import Int4Weight, Int8Weight, unpack_nibbles

INT4_GROUP_SIZES = (32, 64, 128, 256)
_COMPUTE = torch.bfloat16
_CHUNK_ROWS = 4096  # rows converted at a time: bounds the int32 scratch the packer needs


def int4_supported(n: int, k: int, group_size: int) -> bool:
    return group_size in INT4_GROUP_SIZES and n % 16 == 0 and k % group_size == 0


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> torch's CPU int4 layout, converted in chunks of whole 64-row blocks."""
    a = q.numpy()
    chunks = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(a[i : i + _CHUNK_ROWS].astype(np.int32)), 1)
        for i in range(0, a.shape[0], _CHUNK_ROWS)
    ]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _int4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Values 0..15, uint8 [len(rows), K], of the given rows of a CPU-layout int4 weight."""
    n, k = packed.shape[0], packed.shape[1] * 2
    full = n // 64 * 64
    block, r = rows // 64, rows % 64
    in_tail = rows >= full
    tail = n - full
    base = torch.where(in_tail, full * k // 2, block * 32 * k)
    stride = torch.where(in_tail, torch.full_like(rows, max(tail // 2, 1)), torch.full_like(rows, 32))
    within = torch.where(in_tail, (rows - full) // 2, r % 32)
    shift = torch.where(in_tail, (rows - full) % 2, (r >= 32).long()) * 4
    idx = base[:, None] + torch.arange(k)[None, :] * stride[:, None] + within[:, None]
    return (packed.reshape(-1)[idx] >> shift[:, None].to(torch.uint8)) & 0xF


def _scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, K/G] each -> [K/G, N, 2] in the compute dtype."""
    return torch.stack((scales.float(), zeros.float()), dim=-1).transpose(0, 1).contiguous().to(_COMPUTE)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


class CpuWeight(nn.Module):
    """A packed weight in the CPU kernels' layout: `linear(x, bias)`, `embedding(ids)`, `nbytes`.

    `dtype` is the model's activations' dtype (what `embedding` returns), not the storage's;
    `compute_dtype` is the one the kernel reads and writes: `linear` returns x's dtype, and
    converts only an x of another dtype (in, and the result back).
    """

    compute_dtype = _COMPUTE

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.shape = shape
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """x as [T, K] in the compute dtype. The checks are Python's, not ops: at batch 1 a
        no-op `reshape` or `to` still costs a dispatch, and a model has 4 linears a layer."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.shape[1])
        return x2 if x2.dtype == _COMPUTE else x2.to(_COMPUTE)

    def _finish(self, y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if bias is not None:
            y = y + bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.shape[0])

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self._rows(flat).to(self.dtype).view(*ids.shape, self.shape[1])


class CpuInt4(CpuWeight):
    def __init__(self, w: Int4Weight, dtype: torch.dtype):
        super().__init__(w.shape, dtype)
        self.group_size = w.group_size
        self.register_buffer("packed", _pack_int4(unpack_nibbles(w.qweight)))
        zeros = w.offsets.float() + 8 * w.scales.float()
        self.register_buffer("scales_and_zeros", _scales_and_zeros(w.scales, zeros))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._finish(_int4_mm(self._flat(x), self.packed, self.group_size, self.scales_and_zeros), bias, x)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        q = _int4_rows(self.packed, rows).float() - 8
        sz = self.scales_and_zeros[:, rows].float()  # [K/G, T, 2]
        g = self.group_size
        return q * sz[..., 0].t().repeat_interleave(g, 1) + sz[..., 1].t().repeat_interleave(g, 1)


class CpuInt8Planes(CpuWeight):
    """int8 with groups of 32+ as one int4 matmul over [high plane, low plane] of q + 128, 2K
    columns, see the module doc."""

    def __init__(self, w: Int8Weight, dtype: torch.dtype):
        super().__init__(w.shape, dtype)
        self.group_size = w.group_size
        u = w.qweight.numpy().view(np.uint8) ^ 0x80  # q + 128 (flipping the sign bit)
        self.register_buffer("packed", _pack_int4(torch.from_numpy(np.concatenate((u >> 4, u & 0xF), axis=1))))
        s = w.scales.float()
        high, low = _scales_and_zeros(16 * s, torch.zeros_like(s)), _scales_and_zeros(s, 8 * s)
        self.register_buffer("scales_and_zeros", torch.cat((high, low)))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = self._flat(x)
        y = _int4_mm(torch.cat((x2, x2), dim=1), self.packed, self.group_size, self.scales_and_zeros)
        return self._finish(y, bias, x)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        k = self.shape[1]
        nibbles = _int4_rows(self.packed, rows).float()
        s = self.scales_and_zeros[k // self.group_size :, rows, 0].float().t().repeat_interleave(self.group_size, 1)
        return (nibbles[:, :k] * 16 + nibbles[:, k:] - 128) * s


class CpuInt8Interleaved(CpuWeight):
    """int8 with groups of G (Q6_K's 16) as one int4 matmul over 2K columns in groups of 2G: the
    low nibbles of q + 136, then the high ones, beside each other, see the module doc."""

    OFFSET = 136  # the kernel's -8 on both nibbles: (lo - 8) + 16 (hi - 8) = lo + 16 hi - 136

    def __init__(self, w: Int8Weight, dtype: torch.dtype):
        super().__init__(w.shape, dtype)
        n, k = w.shape
        self.group_size = g = w.group_size
        q = w.qweight.numpy().view(np.uint8)
        self.register_buffer("packed", torch.cat([_pack_int4(self._nibbles(q[i : i + _CHUNK_ROWS], g))
                                                  for i in range(0, n, _CHUNK_ROWS)]))
        s = w.scales.float()
        self.register_buffer("scales_and_zeros", _scales_and_zeros(s, torch.zeros_like(s)))

    @classmethod
    def _nibbles(cls, q: np.ndarray, g: int) -> torch.Tensor:
        """int8 rows (as bytes) [R, K] -> the int4 values [R, 2K], a chunk at a time to bound the scratch."""
        u = ((q ^ 0x80) + (cls.OFFSET - 128)).reshape(q.shape[0], -1, 1, g)  # q + 136; fits() keeps it a byte
        return torch.from_numpy(np.concatenate((u & 0xF, u >> 4), axis=2).reshape(q.shape[0], -1))

    @classmethod
    def fits(cls, w: Int8Weight) -> bool:
        n, k = w.shape
        return int4_supported(n, 2 * k, 2 * w.group_size) and int(w.qweight.max()) + cls.OFFSET <= 255

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k, g = self.shape[1], self.group_size
        x4 = x.reshape(-1, k // g, 1, g).to(_COMPUTE)
        x2 = torch.cat((x4, x4 * 16), dim=2).reshape(x4.shape[0], 2 * k)  # * 16 is exact in bfloat16
        return self._finish(_int4_mm(x2, self.packed, 2 * g, self.scales_and_zeros), bias, x)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        k, g = self.shape[1], self.group_size
        nibbles = _int4_rows(self.packed, rows).view(-1, k // g, 2, g).float()
        q = nibbles[:, :, 0] + 16 * nibbles[:, :, 1] - self.OFFSET
        return (q * self.scales_and_zeros[:, rows, 0].float().t()[..., None]).reshape(rows.shape[0], k)


class CpuDense(CpuWeight):
    """A packed weight the CPU kernels cannot take (a shape they refuse), dequantized once."""

    def __init__(self, w: Int4Weight | Int8Weight, dtype: torch.dtype):
        super().__init__(w.shape, dtype)
        self.compute_dtype = dtype
        self.register_buffer("weight", w.dequantize().to(dtype))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight, bias).to(x.dtype)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[rows]


def cpu_weight(w: Int4Weight | Int8Weight, dtype: torch.dtype) -> CpuWeight:
    """The fastest CPU form of a packed weight."""
    n, k = w.shape
    if int4_supported(n, k, w.group_size):
        return CpuInt4(w, dtype) if isinstance(w, Int4Weight) else CpuInt8Planes(w, dtype)
    if isinstance(w, Int8Weight) and CpuInt8Interleaved.fits(w):
        return CpuInt8Interleaved(w, dtype)
    return CpuDense(w, dtype)
