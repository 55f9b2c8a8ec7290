"""Physical KV blocks: reference counts, an LRU free list and the prefix-cache index.

A block whose last reference goes away keeps its contents and its hash: it is *cached free*.
It stays findable by hash until an allocation needs it, and allocations always take the
least recently freed block, so the free list doubles as the LRU eviction order. All of
allocate / free / hit are O(1) per block thanks to an intrusive doubly linked list.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = b"edgepaged-root"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash one full block, chained through its parent so the hash names the whole prefix.

    A cryptographic digest (not Python's `hash`) because a collision would silently serve
    another prompt's keys and values.
    """
    h = hashlib.blake2b(parent or ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


def hash_block_chain(parent: BlockHash | None, token_ids: Sequence[int], block_size: int, start: int, stop: int):
    """The hashes of full blocks `start` up to `stop` of `token_ids`, chained from `parent`:
    `hash_block_tokens` block by block, with the ids packed to bytes once for the whole run
    (the per-block packing was most of the cost of admitting a long prompt)."""
    width = block_size * 8
    packed = array("q", token_ids[start * block_size : stop * block_size]).tobytes()
    for offset in range(0, (stop - start) * width, width):
        h = hashlib.blake2b(parent or ROOT_HASH, digest_size=16)
        h.update(packed[offset : offset + width])
        parent = h.digest()
        yield parent


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)


class _FreeList:
    """Intrusive doubly linked list with sentinels: O(1) push-back, pop-front, remove."""

    def __init__(self, blocks: Iterable[Block]):
        self.head = Block(-1)
        self.tail = Block(-2)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for block in blocks:
            self.push_back(block)

    def push_back(self, block: Block) -> None:
        last = self.tail.prev
        assert last is not None and block.prev is None and block.next is None
        last.next, block.prev = block, last
        block.next, self.tail.prev = self.tail, block
        self.size += 1

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, "block is not on the free list"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def pop_front(self) -> Block:
        first = self.head.next
        assert first is not None and first is not self.tail, "free list is empty"
        self.remove(first)
        return first

    def __iter__(self):
        node = self.head.next
        while node is not self.tail:
            yield node
            node = node.next


class BlockPool:
    """The fixed set of physical blocks, allocated once; never grows."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_list = _FreeList(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.num_cached_free = 0  # free blocks still indexed by prefix hash (kept as a counter: stats are read every step)
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (cached free ones included: they are evictable)."""
        return self.free_list.size

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.free_list.size

    def allocate(self, n: int) -> list[Block]:
        """Take `n` blocks from the LRU end, evicting whatever prefix they still cached."""
        if n > self.free_list.size:
            raise RuntimeError(f"asked for {n} KV blocks with {self.free_list.size} free")
        out = []
        for _ in range(n):
            block = self.free_list.pop_front()
            if block.block_hash is not None:
                self.num_cached_free -= 1
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def acquire(self, block: Block) -> None:
        """Take one more reference to a block found in the cache (it may be free right now)."""
        if block.ref_count == 0:
            self.free_list.remove(block)
            self.num_cached_free -= block.block_hash is not None
        block.ref_count += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; the order given is the order they become evictable.

        Callers pass a sequence's blocks tail first, so the deepest (least shareable) blocks of a
        prefix are evicted before the shallow ones that more prompts share.
        """
        for block in blocks:
            assert block.ref_count > 0, f"block {block.block_id} released more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_list.push_back(block)
                self.num_cached_free += block.block_hash is not None

    def register(self, block: Block, block_hash: BlockHash) -> None:
        """Make a just-filled block findable by its prefix hash.

        If an identical block is already indexed the new one stays anonymous: the index maps a
        hash to one block, and both hold the same keys and values anyway.
        """
        assert block.ref_count > 0, "only a block a sequence holds can be filled and indexed"
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            block.block_hash = block_hash

    def reset_cache(self) -> int:
        """Forget every cached-free block's contents (e.g. after new weights); returns how many."""
        dropped = 0
        for block in self.free_list:
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
                dropped += 1
        self.num_cached_free = 0
        return dropped
