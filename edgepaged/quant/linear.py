"""A packed weight on its device, behind the interface `models.llama` calls for every format:
`linear(x, bias)`, `embedding(ids)`, `nbytes`, `shape`, the activations' `dtype`/`device`, and
`compute_dtype`, the activations' dtype its kernel reads and writes (`linear` returns x's dtype,
converting only an x of another one).

On CUDA the weight stays in the shared layout (formats.py) and runs the Triton W4A16/W8A16
kernels of `edgepaged.kernels.quant_matmul`, imported on first use so a CPU install never needs
Triton; on the CPU it is repacked for PyTorch's own kernels (cpu.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import cpu_weight
from .formats import Int4Weight, Int8Weight, PackedWeight, cat_rows, same_format


@functools.cache
def _gpu_kernels():
    from ..kernels import quant_matmul

    return quant_matmul


class CudaWeight(nn.Module):
    """A packed weight in the shared layout on a GPU."""

    def __init__(self, w: PackedWeight, dtype: torch.dtype, device: torch.device):
        super().__init__()
        _gpu_kernels()  # a missing kernel module fails the load, not the first step
        self.shape, self.dtype, self.group_size = w.shape, dtype, w.group_size
        self.compute_dtype = dtype
        self.bits = w.bits
        w = w.to(device)
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scales", w.scales)
        self.register_buffer("offsets", w.offsets if isinstance(w, Int4Weight) else None)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _packed(self) -> PackedWeight:
        if self.bits == 4:
            return Int4Weight(self.qweight, self.scales, self.offsets, self.group_size)
        return Int8Weight(self.qweight, self.scales, self.group_size)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k = _gpu_kernels()
        x2 = x.reshape(-1, self.shape[1])
        if self.bits == 4:
            y = k.w4a16_linear(x2, self.qweight, self.scales, self.offsets, self.group_size, bias)
        else:
            y = k.w8a16_linear(x2, self.qweight, self.scales, self.group_size, bias)
        return y.view(*x.shape[:-1], self.shape[0])

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._packed().take_rows(ids.reshape(-1)).dequantize()
        return rows.to(self.dtype).view(*ids.shape, self.shape[1])


class DenseWeight(nn.Module):
    """A float weight as one part of a `ConcatWeight` (a fused projection mixing formats)."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.shape, self.dtype = tuple(w.shape), dtype
        self.compute_dtype = dtype
        self.register_buffer("weight", w.to(device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight, bias).to(x.dtype)


class ConcatWeight(nn.Module):
    """Row blocks of one fused projection stored in different formats (GGUF Q4_K_M keeps q/k in
    Q4_K and v in Q6_K): one matmul per block, outputs concatenated.

    Repacking the odd block into its neighbours' format would be lossy (a Q6_K block does not
    fit 4 bits, and a Q4_K block's offsets are no multiple of an int8 scale), so the blocks stay
    as shipped at the price of one extra launch and a copy of the (small) output.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        self.dtype = parts[0].dtype
        self.compute_dtype = parts[0].compute_dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([p.linear(x) for p in self.parts], dim=-1)
        return y if bias is None else (y + bias).to(x.dtype)


def device_weight(w: PackedWeight, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A packed weight ready to run on `device`, computing in `dtype`."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaWeight(w, dtype, device)
    if device.type == "cpu":
        return cpu_weight(w, dtype)
    raise ValueError(f"quantized weights run on cpu or cuda, not {device.type}; load the model dequantized")


def fused_weight(parts: list[PackedWeight | torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """One weight for the row blocks of a fused projection, in order: a single packed weight when
    the blocks share a format, else a `ConcatWeight` of runs of blocks that do."""
    runs: list[list] = []
    for p in parts:
        if runs and _joins(runs[-1], p):
            runs[-1].append(p)
        else:
            runs.append([p])
    modules = [
        DenseWeight(torch.cat(run), dtype, device) if isinstance(run[0], torch.Tensor) else device_weight(cat_rows(run), dtype, device)
        for run in runs
    ]
    return modules[0] if len(modules) == 1 else ConcatWeight(modules)


def _joins(run: list, p) -> bool:
    if isinstance(p, torch.Tensor) or isinstance(run[0], torch.Tensor):
        return isinstance(p, torch.Tensor) and isinstance(run[0], torch.Tensor)
    return same_format([run[0], p])


def is_packed(value) -> bool:
    return isinstance(value, (Int4Weight, Int8Weight))
