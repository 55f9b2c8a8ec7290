"""Paged attention through the Triton kernels in `edgepaged.kernels`.

Per layer, `forward` is three or four kernel launches and one output allocation: write this
step's K/V into their slots, decode attention over the first `num_decode_tokens` rows, prefill
attention over the rest, both into one output tensor. Everything derived from the batch (the
split-K plan and its scratch) is made once in `prepare` and shared by every layer, and nothing
reads a device value back to the host, so a step can run ahead of the GPU or be captured.
8-bit pools arrive as `QuantizedCache`: the same launches, with the scales passed along (the
write quantizes, the attention kernels dequantize in registers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import DecodePlan, paged_decode_attention, paged_prefill_attention, plan_decode, write_kv
from ..attention import AttentionBackend, AttentionBatch, QuantizedCache
from ..config import DecodeFusions


@dataclass(slots=True)
class TritonPrepared:
    batch: AttentionBatch
    decode_plan: DecodePlan | None  # None when the step has no decode rows


class TritonBackend(AttentionBackend):
    """`merge_in_kernel` (DecodeFusions.attn, from EDGEPAGED_FUSIONS; settable for measurement
    before graphs are captured): a split decode context merges inside the attention launch."""

    name = "triton"
    attends_written_kv = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.merge_in_kernel = DecodeFusions.from_env().attn

    def prepare(self, batch: AttentionBatch) -> TritonPrepared:
        if not batch.num_decode_tokens:
            return TritonPrepared(batch, None)
        plan = plan_decode(
            batch.num_decode_tokens,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            batch.max_decode_context_len,
            batch.slot_mapping.device,
            merge_in_kernel=self.merge_in_kernel,
        )
        return TritonPrepared(batch, plan)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | QuantizedCache,
        v_cache: torch.Tensor | QuantizedCache,
        prepared: TritonPrepared,
    ) -> torch.Tensor:
        batch = prepared.batch
        scales = {}
        if isinstance(k_cache, QuantizedCache):
            scales = {"k_scale": k_cache.scale, "v_scale": v_cache.scale}
            k_cache, v_cache = k_cache.data, v_cache.data
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping, **scales)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = batch.num_decode_tokens
        if nd:
            paged_decode_attention(
                q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, self.scale,
                out=out[:nd], plan=prepared.decode_plan, **scales,
            )
        if batch.num_prefills:
            paged_prefill_attention(
                q[nd:], k_cache, v_cache, batch.prefill_block_tables, batch.prefill_query_start_loc,
                batch.prefill_context_lens, self.scale, out=out[nd:], max_query_len=batch.max_prefill_query_len,
                **scales,
            )
        return out

    def attend_written(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: TritonPrepared
    ) -> torch.Tensor:
        batch = prepared.batch
        return paged_decode_attention(
            q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, self.scale,
            plan=prepared.decode_plan,
        )
