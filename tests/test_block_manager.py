"""Block pool invariants: prefix-cache registration at allocation, ref counts, fork, copy-on-write, LRU eviction."""
from __future__ import annotations

import torch

from prmkern.engine.block_manager import BlockManager
from prmkern.sampling_params import SamplingParams
from prmkern.engine.sequence import Request, Sequence


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    req = Request(seq_id, None, tokens, SamplingParams())
    return Sequence(seq_id, req, 0, torch.Generator())


def test_allocation_registers_full_blocks_for_same_step_sharing():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(0, list(range(10)))  # 2 full blocks + 2 tokens
    assert bm.allocate(a) and len(a.block_table) == 3
    b = make_seq(1, list(range(9)))  # same two full blocks, registered but not yet computed
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert bm.owner(a.block_table[0]) == 0 and not bm.is_computed(a.block_table[0])
    assert bm.num_free_blocks == 10 - 4


def test_lru_keeps_prefix_until_space_is_needed():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(8)))
    bm.allocate(a)
    a.num_computed_tokens = 8
    bm.mark_computed(a, 0)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4  # free, yet still cached
    b = make_seq(1, list(range(8)) + [99])
    assert bm.allocate(b) and b.block_table[:2] == a_blocks
    assert bm.is_computed(b.block_table[0]) and bm.is_computed(b.block_table[1])
    bm.free(b)
    # Filling the pool with other tokens evicts the cached blocks (least recently freed first).
    c = make_seq(2, list(range(100, 116)))
    assert bm.allocate(c)
    d = make_seq(3, list(range(8)) + [1])
    bm.free(c)
    assert bm.allocate(d) and not bm.is_computed(d.block_table[0])


def test_uncomputed_blocks_leave_the_cache_when_freed():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, [1, 2, 3, 4])
    bm.allocate(a)
    bm.free(a)  # never computed: its registrations must not serve a later lookup
    b = make_seq(1, [1, 2, 3, 4])
    bm.allocate(b)
    assert bm.owner(b.block_table[0]) == 1


def test_fork_and_copy_on_write_of_partial_tail():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(0, list(range(6)))  # 1 full block + 2 tokens in the tail
    bm.allocate(parent)
    child = parent.fork(1, 1, torch.Generator())
    bm.fork(parent, child)
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 2]
    child.token_ids.append(7)
    child.num_computed_tokens = 6
    copies = bm.append_slot(child)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    parent.token_ids.append(8)
    assert bm.append_slot(parent) == []  # now the only holder of its tail: writes in place
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 1]


def test_append_slot_reports_exhaustion():
    bm = BlockManager(num_blocks=1, block_size=2)
    s = make_seq(0, [1, 2])
    assert bm.allocate(s)
    s.token_ids.append(3)
    assert bm.append_slot(s) is None


def test_hash_collision_guard():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, [1, 2])
    bm.allocate(a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9)  # as if another token pair hashed the same
    assert bm._lookup(None, (1, 2)) is None
