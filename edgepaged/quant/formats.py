"""The packed weight layouts every quantized checkpoint is repacked into, one dataclass each.

This is the layout the GPU kernels (`edgepaged.kernels.quant_matmul`) read, and the one the CPU
path repacks from at load time (quant/cpu.py). N is the output features, K the input features,
G the group size; a weight's groups run along K, so a row of the weight is a row of every
tensor below, and rows can be taken or concatenated freely (the rope row permutation of GGUF
q/k weights, the fused qkv_proj / gate_up_proj).

- int4: `qweight` uint8 [N, K//2], byte j of row n holds k=2j in its low nibble and k=2j+1 in
  its high one; `scales`, `offsets` float16 [N, K//G]; w[n, k] = q * scales[n, k//G] +
  offsets[n, k//G], q in 0..15, G in {32, 64, 128}.
- int8: `qweight` int8 [N, K]; `scales` float16 [N, K//G]; w = q * scales[n, k//G].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


def _per_group(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/G] -> [N, K] float32, each group's value repeated over its G columns."""
    return t.float().repeat_interleave(group_size, dim=1)


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] of 0..15: the low nibble of byte j is k=2j, the high one 2j+1."""
    if qweight.device.type != "cpu":
        return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)
    # numpy: torch's uint8 bit ops on the CPU are many times slower, and loading is all bit ops.
    a = qweight.numpy()
    out = np.empty((a.shape[0], a.shape[1] * 2), dtype=np.uint8)
    np.bitwise_and(a, 0xF, out=out[:, 0::2])
    np.right_shift(a, 4, out=out[:, 1::2])
    return torch.from_numpy(out)


def pack_nibbles(q: np.ndarray) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> uint8 [N, K/2], the inverse of `unpack_nibbles`."""
    return torch.from_numpy(q[:, 0::2] | (q[:, 1::2] << 4))


def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":  # numpy's fancy indexing of small rows is several times faster here
        return torch.from_numpy(t.numpy()[rows.numpy()])
    return t[rows]


@dataclass(frozen=True)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [N, K//2]
    scales: torch.Tensor  # float16 [N, K//G]
    offsets: torch.Tensor  # float16 [N, K//G]
    group_size: int

    bits = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        q = unpack_nibbles(self.qweight).float()
        return q * _per_group(self.scales, self.group_size) + _per_group(self.offsets, self.group_size)

    def take_rows(self, rows: torch.Tensor) -> Int4Weight:
        return replace(self, qweight=_take(self.qweight, rows), scales=_take(self.scales, rows), offsets=_take(self.offsets, rows))

    def to(self, device) -> Int4Weight:
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device), offsets=self.offsets.to(device))


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float16 [N, K//G]
    group_size: int

    bits = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * _per_group(self.scales, self.group_size)

    def take_rows(self, rows: torch.Tensor) -> Int8Weight:
        return replace(self, qweight=_take(self.qweight, rows), scales=_take(self.scales, rows))

    def to(self, device) -> Int8Weight:
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device))


PackedWeight = Int4Weight | Int8Weight


def same_format(parts: list[PackedWeight]) -> bool:
    """Whether the parts can be concatenated row-wise into one weight (same bits, group size and K)."""
    first = parts[0]
    return all(type(p) is type(first) and p.group_size == first.group_size and p.shape[1] == first.shape[1] for p in parts)


def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """One weight whose rows are the parts' rows in order (the parts must share a format)."""
    if not same_format(parts):
        raise ValueError("only weights of one format, group size and K concatenate row-wise")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    fields = ("qweight", "scales", "offsets") if isinstance(first, Int4Weight) else ("qweight", "scales")
    return replace(first, **{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})
