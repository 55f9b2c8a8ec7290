"""Plain PyTorch references for the kernels, and the random paged layouts they are tested on.

The references gather the paged cache into dense per-sequence keys and run masked softmax in
fp32, which is slow and memory-hungry but obviously right. The layout builder is shared by the
CPU tests, the GPU tests and the GPU check script, so all three probe the same hazards: physical
blocks in random order, a block shared by two sequences, table padding that points at a block
full of NaN, and every unused slot of the cache poisoned with NaN, so a kernel that reads one
key too many, or lets a masked value through, produces NaN instead of a plausible number.
8-bit layouts (int8, fp8 e4m3) are the same layouts quantized afterwards: a NaN row's scale is
NaN (and an fp8 row's codes too), so the poison survives quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgepaged.attention import dequantize_kv, quantize_kv

POISON_BLOCK = 0  # block tables are padded with this id; the block only ever holds NaN


def _codes(cache: torch.Tensor) -> torch.Tensor:
    """A cache viewed so that indexing works for every dtype (torch does not index fp8 on the CPU)."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter key/value rows into their slots; negative slots are skipped, as in the kernel.
    With scales, the caches are 8-bit and each row is quantized (`quantize_kv`) on the way in."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if scale is None:
            cache.view(-1, *cache.shape[2:])[slots] = x[keep]
            continue
        codes, row_scales = quantize_kv(x[keep], cache.dtype)
        _codes(cache).view(-1, *cache.shape[2:])[slots] = _codes(codes)
        scale.view(-1, scale.shape[2])[slots] = row_scales


def _gather(
    cache: torch.Tensor, block_tables: torch.Tensor, num_keys: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense keys [seqs, num_keys, Hkv, D] in fp32 from the paged cache (dequantized with scales)."""
    block_size = cache.shape[1]
    pos = torch.arange(num_keys, device=cache.device)
    blocks = block_tables[:, pos // block_size].long()
    if scale is None:
        return cache[blocks, pos % block_size].float()
    codes = _codes(cache)[blocks, pos % block_size].view(cache.dtype)
    return dequantize_kv(codes, scale[blocks, pos % block_size], torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q [N, M, Hq, D] over k/v [N, L, Hkv, D] where visible [N, M, L]; fp32 [N, M, Hq, D].

    A query that sees no key returns zeros, the kernels' convention for padded rows. Keys that
    are not visible are zeroed before use, so poisoned slots cannot leak through 0 * NaN.
    """
    n, m, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    hidden = ~visible.any(dim=1)  # keys nobody looks at: [N, L]
    k = k.masked_fill(hidden[:, :, None, None], 0.0)
    v = v.masked_fill(hidden[:, :, None, None], 0.0)
    qg = q.float().reshape(n, m, num_kv_heads, group, head_dim)
    scores = torch.einsum("nmhgd,nlhd->nhgml", qg, k) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("nhgml,nlhd->nmhgd", probs, v)
    return out.reshape(n, m, num_q_heads, head_dim)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; each sequence's one query sees its first context_lens[b] keys. fp32 out."""
    num_keys = max(int(context_lens.max()), 1) if context_lens.numel() else 1
    k = _gather(k_cache, block_tables, num_keys, k_scale)
    v = _gather(v_cache, block_tables, num_keys, v_scale)
    visible = torch.arange(num_keys, device=q.device)[None, None, :] < context_lens[:, None, None]
    return _attend(q[:, None], k, v, visible, scale)[:, 0]


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunks of q [T, Hq, D] over their cached prefix and themselves, causally. fp32 out.

    One sequence at a time: a batched gather would hold T x context keys at once.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for s, context_len in enumerate(context_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        k = _gather(k_cache, block_tables[s : s + 1], context_len, k_scale)
        v = _gather(v_cache, block_tables[s : s + 1], context_len, v_scale)
        q_pos = torch.arange(context_len - (hi - lo), context_len, device=q.device)
        visible = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
        out[lo:hi] = _attend(q[None, lo:hi], k, v, visible[None], scale)[0]
    return out


@dataclass(slots=True)
class PagedKV:
    """A random paged cache and the tables that describe its sequences."""

    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], NaN wherever no sequence lives
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], padded with POISON_BLOCK
    context_lens: torch.Tensor  # int32 [num_seqs]
    k_scale: torch.Tensor | None = None  # float16 [num_blocks, block_size, Hkv] of an 8-bit cache, NaN where unused
    v_scale: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PagedKV:
        moved = [None if t is None else t.to(device) for t in (self.k_scale, self.v_scale)]
        return PagedKV(
            self.k_cache.to(device), self.v_cache.to(device), self.block_tables.to(device), self.context_lens.to(device),
            *moved,
        )


def quantize_cache(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float cache [blocks, block_size, Hkv, D] as `dtype` codes and float16 scales; a row
    holding NaN gets a NaN scale (and NaN codes in fp8), so the poison carries over."""
    poisoned = cache.isnan().any(dim=-1)
    codes, scale = quantize_kv(cache.nan_to_num(0.0), dtype)
    scale = scale.masked_fill(poisoned, float("nan"))
    if dtype == torch.float8_e4m3fn:
        codes.view(torch.uint8)[poisoned] = 0x7F  # e4m3fn's NaN
    return codes, scale


def quantized(kv: PagedKV, dtype: torch.dtype | None) -> PagedKV:
    """The same layout with an 8-bit cache (None: unchanged)."""
    if dtype is None:
        return kv
    (k, k_scale), (v, v_scale) = quantize_cache(kv.k_cache, dtype), quantize_cache(kv.v_cache, dtype)
    return PagedKV(k, v, kv.block_tables, kv.context_lens, k_scale, v_scale)


def random_paged_kv(
    context_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    shared_prefix_blocks: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> PagedKV:
    """Sequences with random keys/values in randomly placed blocks.

    With `shared_prefix_blocks`, every sequence's first blocks are the first sequence's (the
    layout a prefix-cache hit produces), so those sequences also share those keys. `kv_dtype`
    (int8, float8_e4m3fn) quantizes the cache, with scales.
    """
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    full_first = context_lens[0] // block_size if context_lens else 0  # only full blocks are shared
    shared = [min(shared_prefix_blocks, full_first, b) if i else 0 for i, b in enumerate(blocks_per_seq)]
    needed = sum(b - s for b, s in zip(blocks_per_seq, shared, strict=True))
    spare = needed // 2 + 2
    num_blocks = 1 + needed + spare
    perm = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    width = max(blocks_per_seq + [1])
    tables = torch.full((len(context_lens), width), POISON_BLOCK, dtype=torch.int32)
    for i, (b, s) in enumerate(zip(blocks_per_seq, shared, strict=True)):
        tables[i, :s] = tables[0, :s]
        tables[i, s:b] = torch.tensor(perm[: b - s], dtype=torch.int32)
        perm = perm[b - s :]

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for i, n in enumerate(context_lens):
        pos = torch.arange(n)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        fresh = torch.randn(2, n, num_kv_heads, head_dim, generator=generator).to(dtype)
        first_own = shared[i] * block_size  # keys in shared blocks already exist
        write_kv_ref(fresh[0, first_own:], fresh[1, first_own:], k_cache, v_cache, slots[first_own:])
    kv = PagedKV(k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32))
    return quantized(kv, kv_dtype).to(device)


@dataclass(slots=True)
class PagedStep:
    """One engine step over random sequences: decodes first, then prefill chunks.

    The cache holds every key before this step; the step's own slots hold NaN until the
    backend writes k/v into them, so attention that runs before the write cannot pass.
    """

    kv: PagedKV  # tables and context lengths of all sequences, decodes first
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [T]
    num_decode_tokens: int
    query_start_loc: torch.Tensor  # int32 [num_prefills + 1], relative to the prefill rows
    max_query_len: int


def random_paged_step(
    decode_context_lens: list[int],
    prefill_context_lens: list[int],
    prefill_query_lens: list[int],
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    kv_dtype: torch.dtype | None = None,
) -> PagedStep:
    """With `kv_dtype` the cache is 8-bit (the step's own slots poisoned in their scales); the
    step's k/v stay in `dtype`, for the backend to quantize as it writes them."""
    kv = random_paged_kv(
        decode_context_lens + prefill_context_lens, block_size, num_kv_heads, head_dim, dtype, "cpu", generator
    )
    new_lens = [1] * len(decode_context_lens) + prefill_query_lens
    slots = []
    for i, (n, context_len) in enumerate(zip(new_lens, decode_context_lens + prefill_context_lens, strict=True)):
        pos = torch.arange(context_len - n, context_len)
        slots.append(kv.block_tables[i, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    flat_k = kv.k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = kv.v_cache.view(-1, num_kv_heads, head_dim)
    k, v = flat_k[slot_mapping].clone(), flat_v[slot_mapping].clone()
    flat_k[slot_mapping] = float("nan")
    flat_v[slot_mapping] = float("nan")
    q = torch.randn(slot_mapping.shape[0], num_q_heads, head_dim, generator=generator).to(dtype)
    starts = torch.tensor([0] + prefill_query_lens).cumsum(0).to(torch.int32)
    return PagedStep(
        quantized(kv, kv_dtype).to(device),
        q.to(device),
        k.to(device),
        v.to(device),
        slot_mapping.to(device),
        len(decode_context_lens),
        starts.to(device),
        max(prefill_query_lens, default=0),
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN anywhere in `out` makes it NaN, so it never passes."""
    diff = (out.float() - ref.float()).abs().max()
    return float(diff / ref.float().abs().max().clamp_min(1e-6))


TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
