"""The one interface every attention backend implements.

The model runner describes a step once (`AttentionBatch`); a backend derives whatever it needs
from it once per step (`prepare`), so the per-layer `forward` does no host work. Keeping the
description in plain tensors is what lets the torch reference, the Triton kernels and the
TensorRT plugin share one scheduler and one model.
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


class AttentionBackend(ABC):
    """Paged attention over one layer's K/V pools."""

    name: str

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any:
        """Derive the per-step state every layer reuses (gather indices, masks, split plans)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor:
        """Write this step's K/V into their slots, then attend; returns [T, num_heads, head_dim]."""
