"""Rotary position embedding tables for the rope variants Llama-family configs use.

The tables are computed once for every position the engine may see, so a step only indexes
them; the formulas follow the papers and model cards (Llama 3.1 frequency bands, YaRN ramps,
LongRoPE's per-frequency factors).

The `head_dim` the tables take is the rotary dim: the whole head, or its leading part under
partial rotary (Phi-4-mini rotates 96 of 128), and the tables are that wide.

LongRoPE (Phi-3.5, Phi-4-mini) has two factor sets. transformers rotates a sequence with the
short factors while it is no longer than `original_max_position_embeddings` (4096 for both
models) and with the long ones past that; Phi-3's `generate` drops its KV cache when a sequence
first grows past that length and recomputes it all with the long factors. One table for all
positions has to pick one set, so the context the tables are built for picks it (positions then
rotate the same in every step, batch and recompute, which prefix caching needs):
- an engine context within the pretraining length (`max_model_len <= 4096`): the short factors,
  transformers' numbers for every sequence;
- a longer context: the long factors for every position, transformers' numbers for every step
  of a sequence longer than the pretraining length (a longer prompt, or a sequence after it grew
  past it); a sequence's steps up to that length differ from transformers' short-factor ones.
Following transformers per sequence would need the scheduler to recompute a sequence as it
crosses that length and the prefix cache to key blocks by factor set; that is not done.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int | None = None
) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the attention factor that scales cos/sin; `max_positions`
    (the context the tables cover) picks longrope's factor set."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return base, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return base / factor, 1.0
    if kind == "llama3":
        return _llama3(base, factor, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, factor, scaling)
    if kind == "longrope":
        return _longrope(head_dim, theta, scaling, max_positions)
    raise ValueError(f"rope type {kind!r} is not supported")


def _llama3(inv_freq: torch.Tensor, factor: float, s: dict[str, Any]) -> torch.Tensor:
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, factor: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    old_ctx = float(s.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale = float(s.get("mscale", 1.0) or 1.0)
        attention_factor = 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo = correction_dim(beta_fast)
    hi = correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _longrope(dim: int, theta: float, s: dict[str, Any], max_positions: int | None) -> tuple[torch.Tensor, float]:
    old_ctx = int(s["original_max_position_embeddings"])
    factor = s.get("factor")
    if factor is None:  # Phi-3 derives it from the two lengths instead of storing it
        factor = s["max_position_embeddings"] / old_ctx
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(old_ctx)) if factor > 1 else 1.0
    long = max_positions is not None and max_positions > old_ctx
    ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), float(attention_factor)


def rope_tables(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_positions, head_dim] in fp32, in the rotate-half layout HF weights use
    (`head_dim`: the rotary dim, see the module's docstring)."""
    inv_freq, attention_factor = inv_frequencies(head_dim, theta, scaling, max_positions)
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(device), (emb.sin() * attention_factor).to(device)
