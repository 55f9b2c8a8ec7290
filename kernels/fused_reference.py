"""Plain PyTorch references for the fused elementwise kernels.

Each spells out the eager op sequence of edgepaged.models.llama (fp32 normalisation, a rounding
to the tensor dtype after every op), so a kernel that matches its reference matches the unfused
model path up to the order of the fp32 sum of squares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else x + residual
    x32 = summed.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, summed


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q [T, Hq, D] and k [T, Hkv, D]; the inputs are left alone."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    return rotate(q), rotate(k)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
