"""Plain PyTorch references for the weight-only quantized linears of `quant_matmul`, and a
round-to-nearest quantizer that packs float weights into their layout.

The references dequantize the whole weight to float32 with the layout's own dequantisation
(`edgepaged.quant.formats`, the one the loaders and the CPU path use, so the kernels are held to
the same meaning of the bytes) and call F.linear in float32: slow and memory-hungry, but
obviously right. The quantizer is for tests and benchmarks (asymmetric min/max per group for
int4, symmetric absmax for int8); loaders produce the same layout from GGUF/AWQ/GPTQ tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgepaged.quant.formats import Int4Weight, Int8Weight


def w4a16_linear_ref(x, qweight, scales, offsets, group_size, bias=None) -> torch.Tensor:
    """x [T, K] times the dequantized int4 weight, float32 [T, N]."""
    w = Int4Weight(qweight, scales, offsets, group_size).dequantize()
    return F.linear(x.float(), w, None if bias is None else bias.float())


def w8a16_linear_ref(x, qweight, scales, group_size, bias=None) -> torch.Tensor:
    """x [T, K] times the dequantized int8 weight, float32 [T, N]."""
    w = Int8Weight(qweight, scales, group_size).dequantize()
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
