"""Paged attention in plain PyTorch: the reference every faster backend is checked against.

Each step gathers every sequence's keys and values through its block table into a padded
batch (whole blocks, indices built once per step, reused by all layers) and runs one masked
SDPA for the decodes and one for the prefill chunks. Grouped-query attention needs no K/V
expansion: the query heads of a group are laid out as extra query rows over the group's one
K/V head. A decode step of one sequence needs no mask (its context is the whole gathered
length), which is batch-1 decode on a CPU, where each of a layer's ops counts.

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

    blocks: torch.Tensor  # int64 [S * ceil(L / block_size)]: each sequence's blocks, flat
    length: int  # L: keys gathered per sequence
    mask: torch.Tensor | None  # bool [S, 1, Q * group, L]; None when every key is visible
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
    """One layer's K or V pool [num_blocks, block_size, Hkv, D]; an 8-bit pool as bytes with
    its scales [num_blocks, block_size, Hkv] and the codes' dtype."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype | None = None

    def gather(self, g: _Gather, dtype: torch.dtype) -> torch.Tensor:
        """[S, L, Hkv, D]: whole blocks taken (one index per block, not per slot), then cut to L."""
        def take(t: torch.Tensor) -> torch.Tensor:
            rows = t.index_select(0, g.blocks)
            return rows.view(g.num_seqs, -1, *t.shape[2:])[:, : g.length]

        if self.scale is None:
            return take(self.data)
        return dequantize_kv(take(self.data).view(self.dtype), take(self.scale), dtype)


def _blocks_for(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    return block_tables[:, : -(-length // block_size)].reshape(-1).long()


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def prepare(self, batch: AttentionBatch) -> TorchPrepared:
        group = self.num_heads // self.num_kv_heads
        decode = prefill = None
        if batch.num_decode_tokens:
            length = batch.max_decode_context_len
            mask = None
            if batch.num_decode_tokens > 1:
                kv_pos = torch.arange(length, device=batch.slot_mapping.device)
                visible = kv_pos.unsqueeze(0) < batch.decode_context_lens.unsqueeze(1)  # [S, L]
                mask = visible[:, None, None, :].expand(-1, 1, group, -1)
            decode = _Gather(
                blocks=_blocks_for(batch.decode_block_tables, length, batch.block_size),
                length=length,
                mask=mask,
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
                blocks=_blocks_for(batch.prefill_block_tables, length, batch.block_size),
                length=length,
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
            cache.view(-1, hkv, dim).index_copy_(0, slots, x)
            return _Pool(cache, None)
        codes, scale = quantize_kv(x, cache.dtype)
        # Through bytes: torch has no index_copy_ or gather for fp8 on the CPU.
        data = cache.data.view(torch.uint8)
        data.view(-1, hkv, dim).index_copy_(0, slots, codes.view(torch.uint8))
        cache.scale.view(-1, hkv).index_copy_(0, slots, scale)
        return _Pool(data, cache.scale, cache.dtype)

    def _attend(self, q: torch.Tensor, g: _Gather, k_pool: _Pool, v_pool: _Pool) -> torch.Tensor:
        hq, hkv, dim = self.num_heads, self.num_kv_heads, self.head_dim
        group = hq // hkv
        keys = k_pool.gather(g, q.dtype).transpose(1, 2)  # [S, Hkv, L, D]
        values = v_pool.gather(g, q.dtype).transpose(1, 2)
        if g.rows is None:  # one query a sequence: its heads are already [Hkv, group] in order
            out = F.scaled_dot_product_attention(q.view(g.num_seqs, hkv, group, dim), keys, values, attn_mask=g.mask,
                                                 scale=self.scale)
            return out.reshape(g.num_seqs, hq, dim)
        padded = q.new_zeros(g.num_seqs * g.max_q, hq, dim)
        padded[g.rows] = q
        qs = padded.view(g.num_seqs, g.max_q, hkv, group, dim)
        qs = qs.permute(0, 2, 1, 3, 4).reshape(g.num_seqs, hkv, g.max_q * group, dim)
        out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=g.mask, scale=self.scale)
        out = out.view(g.num_seqs, hkv, g.max_q, group, dim).permute(0, 2, 1, 3, 4).reshape(-1, hq, dim)
        return out[g.rows]
