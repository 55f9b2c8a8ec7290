"""Plain PyTorch references for the weight-only quantized linears of `quant_matmul`, and a
round-to-nearest quantizer that packs float weights into their layout.

The references dequantize the whole weight to float32 and call F.linear in float32: slow and
memory-hungry, but obviously right, and usable as a CPU fallback (cast the result to the
activation dtype). The quantizer is for tests and benchmarks (asymmetric min/max per group for
int4, symmetric absmax for int8); loaders produce the same layout from GGUF/AWQ/GPTQ tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_group(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/G] -> [N, K] float32, each group's value repeated over its G columns."""
    return t.float().repeat_interleave(group_size, dim=1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [N, K/2] (k = 2j in the low nibble of byte j, 2j+1 in the high one) -> float32 [N, K]:
    w = q * scale + offset of the element's group."""
    low, high = (qweight & 0xF), (qweight >> 4)
    q = torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1).float()
    return q * _per_group(scales, group_size) + _per_group(offsets, group_size)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 [N, K] -> float32 [N, K]: w = q * scale of the element's group."""
    return qweight.float() * _per_group(scales, group_size)


def w4a16_linear_ref(x, qweight, scales, offsets, group_size, bias=None) -> torch.Tensor:
    """x [T, K] times the dequantized int4 weight, float32 [T, N]."""
    w = dequantize_int4(qweight, scales, offsets, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def w8a16_linear_ref(x, qweight, scales, group_size, bias=None) -> torch.Tensor:
    """x [T, K] times the dequantized int8 weight, float32 [T, N]."""
    w = dequantize_int8(qweight, scales, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (uint8 [N, K/2], float16 scales [N, K/G], float16 offsets [N, K/G]), min/max
    per group; q is rounded against the fp16 scale and offset the kernels will read."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-8).half()
    offsets = lo.half()
    q = ((groups - offsets.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k // 2, 2)
    return q[..., 0] | (q[..., 1] << 4), scales, offsets


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float16 scales [N, K/G]), symmetric absmax per group."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(-1) / 127).clamp_min(1e-8).half()
    q = (groups / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales
