"""Property tests of the block pool and the KV manager: no leaks, exact ref counts, sound hits."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgepaged.cache import BlockPool, KVCacheManager, hash_block_tokens

BS = 4
NUM_BLOCKS = 12


@dataclass(eq=False)
class FakeSeq:
    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int = 0
    owned: list = field(default_factory=list)


class KVMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / evict against a model of what must hold."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
        self.seqs: dict[int, FakeSeq] = {}
        self.next_id = 0

    def _grow(self, seq: FakeSeq, n: int) -> bool:
        if not self.kv.can_allocate(seq, n):
            return False
        self.kv.allocate(seq, n)
        seq.num_computed_tokens += n
        self.kv.commit(seq)
        return True

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def admit(self, tokens):
        seq = FakeSeq(self.next_id, list(tokens))
        self.next_id += 1
        hit = self.kv.find_prefix(seq)
        # A hit only ever covers identical full blocks, and never counts the last token as
        # computed: a prompt cached to its end recomputes that token into its last block.
        cached = len(hit.blocks) * BS
        assert hit.num_tokens < len(tokens)
        assert hit.num_tokens == (cached - 1 if hit.writes_last_block else cached)
        assert hit.writes_last_block == (cached == len(tokens))
        shared_last = hit.writes_last_block and hit.blocks[-1].ref_count > 0
        for i, block in enumerate(hit.blocks):
            parent = None
            for j in range(i + 1):
                parent = hash_block_tokens(parent, tokens[j * BS : (j + 1) * BS])
            assert block.block_hash == parent
        n = len(tokens) - hit.num_tokens
        if not self.kv.can_allocate(seq, n, hit):
            return
        self.kv.allocate(seq, n, hit)
        if shared_last:  # another sequence reads that block: the write goes into a copy
            src, dst = self.kv.pending_copies[-1]
            assert src == hit.blocks[-1].block_id and self.kv.block_ids(seq.seq_id)[-1] == dst != src
        seq.num_computed_tokens = len(tokens)
        self.kv.commit(seq)
        self.seqs[seq.seq_id] = seq

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data, token):
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        seq.token_ids.append(token)
        if not self._grow(seq, 1):
            seq.token_ids.pop()

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        child = FakeSeq(self.next_id, list(parent.token_ids), parent.num_computed_tokens)
        self.kv.fork(parent, child)
        self.seqs[child.seq_id] = child
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.free(seq_id)
        del self.seqs[seq_id]

    @rule(n=st.integers(1, NUM_BLOCKS))
    def evict_by_allocating(self, n):
        """Take blocks straight from the pool (as another tenant would) and give them back."""
        if n <= self.kv.pool.num_free:
            blocks = self.kv.pool.allocate(n)
            assert all(b.block_hash is None and b.ref_count == 1 for b in blocks)
            self.kv.pool.release(blocks)

    @invariant()
    def ref_counts_are_exact(self):
        expected = [0] * NUM_BLOCKS
        for seq in self.seqs.values():
            for block_id in self.kv.block_ids(seq.seq_id):
                expected[block_id] += 1
        assert [b.ref_count for b in self.kv.pool.blocks] == expected
        self.kv.take_copies()

    @invariant()
    def no_leaks_and_within_pool(self):
        pool = self.kv.pool
        free = list(pool.free_list)
        assert len(free) == pool.num_free == sum(1 for b in pool.blocks if b.ref_count == 0)
        assert len({b.block_id for b in free}) == len(free)
        assert pool.num_used + pool.num_free == NUM_BLOCKS
        assert pool.num_cached_free == sum(1 for b in free if b.block_hash is not None)
        for block_hash, block in pool.cached.items():
            assert block.block_hash == block_hash

    @invariant()
    def tables_cover_tokens(self):
        for seq in self.seqs.values():
            assert len(self.kv.block_ids(seq.seq_id)) == -(-seq.num_computed_tokens // BS)


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def test_lru_evicts_least_recently_freed_and_tail_first():
    kv = KVCacheManager(6, BS)
    a = FakeSeq(0, list(range(8)) + [99])  # two full blocks + 1
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.commit(a)
    b = FakeSeq(1, list(range(100, 108)) + [99])
    kv.allocate(b, 9)
    b.num_computed_tokens = 9
    kv.commit(b)
    kv.free(0)
    kv.free(1)
    order = [blk.block_id for blk in kv.pool.free_list]
    a_ids, b_ids = [0, 1, 2], [3, 4, 5]
    # a freed first, tail first: its partial block, then its deepest full block, then its root.
    assert order == [a_ids[2], a_ids[1], a_ids[0], b_ids[2], b_ids[1], b_ids[0]]
    # A prefix hit on a revives its blocks, so allocating now evicts b's cached blocks first.
    c = FakeSeq(2, list(range(8)) + [7, 7])
    hit = kv.find_prefix(c)
    assert hit.num_tokens == 8
    kv.allocate(c, 2, hit)
    assert kv.block_ids(2) == [0, 1, 2], "hit blocks, then the least recently freed block"
    fresh = kv.pool.allocate(2)
    # b's partial block goes first (nothing cached in it), then b's deepest full block is evicted.
    assert [f.block_id for f in fresh] == [5, 4]
    assert kv.pool.num_evictions == 1 and kv.pool.lookup(hash_block_tokens(None, list(range(100, 104)))) is not None


def test_copy_on_write_on_shared_partial_block():
    kv = KVCacheManager(8, BS)
    parent = FakeSeq(0, [1, 2, 3, 4, 5, 6])
    kv.allocate(parent, 6)
    parent.num_computed_tokens = 6
    kv.commit(parent)
    child = FakeSeq(1, list(parent.token_ids), 6)
    kv.fork(parent, child)
    assert kv.block_ids(0) == kv.block_ids(1)
    assert kv.pool.num_used == 2
    child.token_ids.append(9)
    assert kv.can_allocate(child, 1)
    kv.allocate(child, 1)
    copies = kv.take_copies()
    assert copies == [(kv.block_ids(0)[1], kv.block_ids(1)[1])]
    assert kv.block_ids(0)[0] == kv.block_ids(1)[0], "the full block stays shared"
    parent.token_ids.append(8)
    kv.allocate(parent, 1)
    assert kv.take_copies() == [], "the last holder writes in place"
    assert kv.pool.num_used == 3


def test_pool_refuses_overdraw_and_double_free():
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(AssertionError):
        pool.release(blocks)


def test_pins_belong_to_their_owner():
    """Two owners pinning overlapping prefixes: each unpins only its own references."""
    kv = KVCacheManager(8, BS)
    seq = FakeSeq(0, list(range(12)) + [99])  # three full blocks + 1
    kv.allocate(seq, 13)
    seq.num_computed_tokens = 13
    kv.commit(seq)
    kv.free(0)
    assert kv.pin(list(range(8)), owner="docs") == 2
    assert kv.pin(list(range(12)), owner="manuals") == 3
    assert kv.num_pinned_blocks == 3 and kv.pool.num_used == 3
    kv.unpin("docs")
    assert kv.num_pinned_blocks == 3, "manuals still holds all three"
    kv.pool.allocate(5)  # everything else: the pinned blocks are never evicted
    assert kv.pool.num_free == 0
    kv.unpin("manuals")
    assert kv.num_pinned_blocks == 0 and kv.pool.num_free == 3
