"""Per-sequence block tables over the shared `BlockPool`.

A table is append-only: new tokens land in the last block or in fresh blocks, so the blocks of
a prefix never move and can be shared. The one exception is `trim`, which drops the tail blocks
of a speculative step's rejected drafts. The two ways a table gains shared blocks are a prefix
cache hit at admission and a `fork` for n>1 sampling; a write into a shared block copies it
first (copy-on-write) and reports the copy for the model runner to perform.

The manager reads `num_computed_tokens` and never writes it: the scheduler alone advances it.
A prompt cached to its last block is admitted with that block too, and recomputes only its last
token (whose logits are sampled): into a copy of the block when another sequence holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from .block_pool import Block, BlockHash, BlockPool, hash_block_chain


class SequenceView(Protocol):
    @property
    def seq_id(self) -> int: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def num_computed_tokens(self) -> int: ...


@dataclass(slots=True)
class PrefixHit:
    """Blocks a waiting sequence may reuse, found before it is admitted (not yet referenced).

    `num_tokens` is what the sequence need not compute: every hit token but, for a prompt cached
    to its end, the last one, whose logits are still to be sampled.
    """

    blocks: list[Block]
    num_tokens: int
    writes_last_block: bool = False  # the last token is recomputed into the last hit block


@dataclass(slots=True)
class _Table:
    blocks: list[Block] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_registered: int = 0  # leading blocks already offered to the prefix index


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[int, _Table] = {}
        self._hashes: dict[int, list[BlockHash]] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.pins: dict[str, list[Block]] = {}  # owner -> the blocks it holds out of eviction
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- queries -----------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, seq_id: int) -> list[int]:
        return self.tables[seq_id].block_ids

    def num_table_blocks(self, seq_id: int) -> int:
        table = self.tables.get(seq_id)
        return len(table.blocks) if table else 0

    def _block_hashes(self, seq: SequenceView, num_full_blocks: int) -> list[BlockHash]:
        """The chained hashes of the sequence's first full blocks, extended incrementally."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        if len(hashes) < num_full_blocks:
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_block_chain(parent, seq.token_ids, self.block_size, len(hashes), num_full_blocks))
        return hashes[:num_full_blocks]

    def find_prefix(self, seq: SequenceView) -> PrefixHit:
        """The longest run of cached full blocks matching the sequence's start.

        At least the last token is always left to compute: its logits are what we sample from.
        A prompt cached to its end still takes every block (see `PrefixHit.num_tokens`), so
        identical prompts arriving together compute one token each once the first has run.
        """
        if not self.pool.enable_caching:
            return PrefixHit([], 0)
        hits: list[Block] = []
        num_full = len(seq.token_ids) // self.block_size
        # Hashed in doubling runs up to the first miss, not the whole prompt: a burst of prompts
        # waiting on one shared prefix costs one hash each per step, not one per block.
        run, missed = 1, False
        while len(hits) < num_full and not missed:
            hashes = self._block_hashes(seq, min(num_full, len(hits) + run))
            for block_hash in hashes[len(hits) :]:
                block = self.pool.lookup(block_hash)
                if block is None:
                    missed = True
                    break
                hits.append(block)
            run *= 2
        cached = len(hits) * self.block_size
        if cached < len(seq.token_ids):
            return PrefixHit(hits, cached)
        return PrefixHit(hits, cached - 1, writes_last_block=True)

    def unregistered_hashes(self, seq: SequenceView) -> list[BlockHash]:
        """Hashes of the sequence's full blocks not yet offered to the prefix index: blocks it
        is still computing (see `next_uncached_hash`)."""
        if not self.pool.enable_caching:
            return []
        table = self.tables.get(seq.seq_id)
        start = table.num_registered if table is not None else 0
        return self._block_hashes(seq, len(seq.token_ids) // self.block_size)[start:]

    def next_uncached_hash(self, seq: SequenceView, hit: PrefixHit) -> BlockHash | None:
        """The hash of the first full block of a waiting sequence that `hit` does not cover. If
        a running sequence is computing that very block, waiting a step or two for it to be
        cached beats computing the same tokens twice in the meantime."""
        index = len(hit.blocks)
        if not self.pool.enable_caching or index >= len(seq.token_ids) // self.block_size:
            return None
        return self._block_hashes(seq, index + 1)[index]

    def _cow_needed(self, table: _Table, num_computed: int) -> bool:
        """Whether the next write lands in a block that others also reference."""
        idx = num_computed // self.block_size
        return idx < len(table.blocks) and table.blocks[idx].ref_count > 1

    def _fits_in_place(self, seq: SequenceView, num_new_tokens: int, hit: PrefixHit | None) -> bool:
        """The common decode case, decided without arithmetic over the table: one token that
        lands in an allocated block nobody else references needs nothing from the pool."""
        if num_new_tokens != 1 or hit is not None:
            return False
        table = self.tables.get(seq.seq_id)
        if table is None:
            return False
        idx = seq.num_computed_tokens // self.block_size
        return idx < len(table.blocks) and table.blocks[idx].ref_count == 1

    def can_allocate(self, seq: SequenceView, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        if self._fits_in_place(seq, num_new_tokens, hit):
            return True
        table = self.tables.get(seq.seq_id) or _Table()
        if hit is None:
            hit = PrefixHit([], 0)
        have = len(table.blocks) + len(hit.blocks)
        computed = max(seq.num_computed_tokens, hit.num_tokens)
        need = self.blocks_needed(computed + num_new_tokens) - have
        if hit.writes_last_block:
            need += hit.blocks[-1].ref_count > 0  # held by another sequence: written into a copy
        else:
            need += self._cow_needed(table, computed)
        revived = sum(1 for b in hit.blocks if b.ref_count == 0)  # leave the free list when reused
        return need + revived <= self.pool.num_free

    # -- changes -----------------------------------------------------------------------------
    def allocate(self, seq: SequenceView, num_new_tokens: int, hit: PrefixHit | None = None) -> None:
        """Grow the sequence's table to hold `num_new_tokens` more tokens (after `can_allocate`).

        With a prefix hit the sequence starts with the hit's blocks; the caller then counts
        `hit.num_tokens` as computed.
        """
        if self._fits_in_place(seq, num_new_tokens, hit):
            return
        table = self.tables.setdefault(seq.seq_id, _Table())
        computed = seq.num_computed_tokens
        if hit is not None and hit.blocks:
            assert not table.blocks, "a prefix hit only applies to a sequence without blocks"
            for block in hit.blocks:
                self.pool.acquire(block)
            table.blocks.extend(hit.blocks)
            table.block_ids.extend(b.block_id for b in hit.blocks)
            table.num_registered = len(hit.blocks)
            computed = hit.num_tokens
        if hit is not None and self.pool.enable_caching:
            self.prefix_query_tokens += len(seq.token_ids)
            self.prefix_hit_tokens += hit.num_tokens
        if self._cow_needed(table, computed):
            idx = computed // self.block_size
            src = table.blocks[idx]
            (dst,) = self.pool.allocate(1)
            self.pool.release([src])
            table.blocks[idx], table.block_ids[idx] = dst, dst.block_id
            self.pending_copies.append((src.block_id, dst.block_id))
        need = self.blocks_needed(computed + num_new_tokens) - len(table.blocks)
        if need > 0:
            new = self.pool.allocate(need)
            table.blocks.extend(new)
            table.block_ids.extend(b.block_id for b in new)

    def commit(self, seq: SequenceView) -> None:
        """Index the blocks this step filled, so later prompts with the same prefix find them.

        Only blocks whose token ids the host already knows: a token sampled by a step still on
        the device is computed before it lands in `token_ids`, and its block waits for it.
        """
        if not self.pool.enable_caching:
            return
        table = self.tables[seq.seq_id]
        known = min(seq.num_computed_tokens, len(seq.token_ids))
        if known < (table.num_registered + 1) * self.block_size:
            return  # no block filled since the last commit: most decode steps end here
        num_full = min(known // self.block_size, len(table.blocks))
        if num_full <= table.num_registered:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(table.num_registered, num_full):
            self.pool.register(table.blocks[i], hashes[i])
        table.num_registered = num_full

    def trim(self, seq: SequenceView) -> None:
        """Free the blocks past the sequence's computed tokens: after a speculative verify step
        rolled `num_computed_tokens` back, those that held only rejected drafts. They were never
        indexed (`commit` only indexes blocks of known tokens). The table gets new lists, which
        is how the runner's mirror of it (model_runner._TableMirror) learns it shrank."""
        table = self.tables[seq.seq_id]
        keep = self.blocks_needed(seq.num_computed_tokens)
        if len(table.blocks) <= keep:
            return
        assert table.num_registered <= keep, "an indexed block holds rejected drafts"
        dropped = table.blocks[keep:]
        table.blocks, table.block_ids = table.blocks[:keep], table.block_ids[:keep]
        self.pool.release(reversed(dropped))

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        """Give `child` the parent's blocks by reference: n samples store their prompt once."""
        src = self.tables[parent.seq_id]
        for block in src.blocks:
            self.pool.acquire(block)
        self.tables[child.seq_id] = _Table(list(src.blocks), list(src.block_ids), src.num_registered)
        self._hashes[child.seq_id] = list(self._hashes.get(parent.seq_id, []))

    def free(self, seq_id: int) -> None:
        """Return a finished or preempted sequence's blocks, tail first (see BlockPool.release)."""
        table = self.tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        if table is not None:
            self.pool.release(reversed(table.blocks))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def pin(self, token_ids: Sequence[int], owner: str = "") -> int:
        """Hold an extra reference on the cached full blocks of `token_ids` so LRU never evicts
        them, on behalf of `owner`: owners (one per RAG collection, say) unpin only their own."""
        held = self.pins.setdefault(owner, [])
        pinned = 0
        for block_hash in hash_block_chain(None, token_ids, self.block_size, 0, len(token_ids) // self.block_size):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            self.pool.acquire(block)
            held.append(block)
            pinned += 1
        return pinned

    def unpin(self, owner: str = "") -> None:
        self.pool.release(reversed(self.pins.pop(owner, [])))

    def unpin_all(self) -> None:
        for owner in list(self.pins):
            self.unpin(owner)

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by any pin: what the pool can never lend to a request."""
        return len({b.block_id for blocks in self.pins.values() for b in blocks})

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
