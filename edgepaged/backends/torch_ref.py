"""Paged attention in plain PyTorch: the reference every faster backend is checked against.

Each step gathers every sequence's keys and values through its block table into a padded
batch (indices built once per step, reused by all layers) and runs one masked SDPA for the
decodes and one for the prefill chunks. Grouped-query attention needs no K/V expansion: the
query heads of a group are laid out as extra query rows over the group's one K/V head.

8-bit pools (`QuantizedCache`) are written through `quantize_kv` and gathered through
`dequantize_kv` into the query's dtype: the same format the Triton kernels write and read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionBackend, AttentionBatch, QuantizedCache, dequantize_kv, quantize_kv


@dataclass(slots=True)
class _Gather:
    """One padded attention problem: which cache slots to read and what each query may see."""

    slots: torch.Tensor  # int64 [S, L]
    mask: torch.Tensor  # bool [S, 1, Q * group, L]
    rows: torch.Tensor | None  # int64 [T_part]: flat (s * Q + i) index of each real query row
    num_seqs: int
    max_q: int


@dataclass(slots=True)
class TorchPrepared:
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode: _Gather | None
    prefill: _Gather | None


@dataclass(slots=True)
class _Pool:
    """One layer's K or V pool flattened to slots [num_slots, Hkv, D]; an 8-bit pool as bytes
    with its scales [num_slots, Hkv] and the codes' dtype."""

    flat: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype | None = None

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.flat[slots]
        return dequantize_kv(self.flat[slots].view(self.dtype), self.scale[slots], dtype)


def _slots_for(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size].long() * block_size + pos % block_size


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def prepare(self, batch: AttentionBatch) -> TorchPrepared:
        group = self.num_heads // self.num_kv_heads
        decode = prefill = None
        if batch.num_decode_tokens:
            length = batch.max_decode_context_len
            kv_pos = torch.arange(length, device=batch.slot_mapping.device)
            visible = kv_pos.unsqueeze(0) < batch.decode_context_lens.unsqueeze(1)  # [S, L]
            decode = _Gather(
                slots=_slots_for(batch.decode_block_tables, length, batch.block_size),
                mask=visible[:, None, None, :].expand(-1, 1, group, -1),
                rows=None,
                num_seqs=batch.num_decode_tokens,
                max_q=1,
            )
        if batch.num_prefills:
            device = batch.slot_mapping.device
            length, max_q = batch.max_prefill_context_len, batch.max_prefill_query_len
            starts = batch.prefill_query_start_loc.long()
            q_lens = starts[1:] - starts[:-1]
            ctx = batch.prefill_context_lens.long()
            i = torch.arange(max_q, device=device)
            q_pos = (ctx - q_lens).unsqueeze(1) + i.unsqueeze(0)  # [S, Q]
            kv_pos = torch.arange(length, device=device)
            valid_q = i.unsqueeze(0) < q_lens.unsqueeze(1)
            allowed = kv_pos[None, None, :] <= q_pos[:, :, None]
            # Padding rows attend to key 0 so the softmax stays finite; their output is dropped.
            allowed = torch.where(valid_q[:, :, None], allowed, kv_pos[None, None, :] == 0)
            mask = allowed.repeat_interleave(group, dim=1).unsqueeze(1)  # [S, 1, Q*group, L]
            rows = (torch.arange(len(q_lens), device=device).unsqueeze(1) * max_q + i.unsqueeze(0))[valid_q]
            prefill = _Gather(
                slots=_slots_for(batch.prefill_block_tables, length, batch.block_size),
                mask=mask,
                rows=rows,
                num_seqs=len(q_lens),
                max_q=max_q,
            )
        return TorchPrepared(batch.slot_mapping, batch.num_decode_tokens, decode, prefill)

    def forward(self, q, k, v, k_cache, v_cache, prepared: TorchPrepared) -> torch.Tensor:
        keys, values = self._write(k, k_cache, prepared.slot_mapping), self._write(v, v_cache, prepared.slot_mapping)
        nd = prepared.num_decode_tokens
        parts = []
        if prepared.decode is not None:
            parts.append(self._attend(q[:nd], prepared.decode, keys, values))
        if prepared.prefill is not None:
            parts.append(self._attend(q[nd:], prepared.prefill, keys, values))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _write(self, x: torch.Tensor, cache: torch.Tensor | QuantizedCache, slots: torch.Tensor) -> _Pool:
        """Write this step's rows into their slots; the pool as the gathers will read it."""
        hkv, dim = self.num_kv_heads, self.head_dim
        if not isinstance(cache, QuantizedCache):
            flat = cache.view(-1, hkv, dim)
            flat.index_copy_(0, slots, x)
            return _Pool(flat, None)
        codes, scale = quantize_kv(x, cache.dtype)
        # Through bytes: torch has no index_copy_ or gather for fp8 on the CPU.
        flat = cache.data.view(torch.uint8).view(-1, hkv, dim)
        flat.index_copy_(0, slots, codes.view(torch.uint8))
        flat_scale = cache.scale.view(-1, hkv)
        flat_scale.index_copy_(0, slots, scale)
        return _Pool(flat, flat_scale, cache.dtype)

    def _attend(self, q: torch.Tensor, g: _Gather, k_pool: _Pool, v_pool: _Pool) -> torch.Tensor:
        hq, hkv, dim = self.num_heads, self.num_kv_heads, self.head_dim
        group = hq // hkv
        keys = k_pool.gather(g.slots, q.dtype).transpose(1, 2)  # [S, Hkv, L, D]
        values = v_pool.gather(g.slots, q.dtype).transpose(1, 2)
        if g.rows is None:
            qs = q.view(g.num_seqs, 1, hkv, group, dim)
        else:
            padded = q.new_zeros(g.num_seqs * g.max_q, hq, dim)
            padded[g.rows] = q
            qs = padded.view(g.num_seqs, g.max_q, hkv, group, dim)
        qs = qs.permute(0, 2, 1, 3, 4).reshape(g.num_seqs, hkv, g.max_q * group, dim)
        out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=g.mask, scale=self.scale)
        out = out.view(g.num_seqs, hkv, g.max_q, group, dim).permute(0, 2, 1, 3, 4).reshape(-1, hq, dim)
        return out if g.rows is None else out[g.rows]
