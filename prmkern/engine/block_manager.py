"""The paged KV block pool: reference counts, the prefix cache, fork, copy-on-write and LRU eviction.

Blocks hold `block_size` tokens. A full block is identified by a hash chain (its tokens and its predecessor's
hash), so equal prefixes map to the same physical blocks. Prompt blocks are registered in the prefix cache as
soon as they are allocated, before their KV is computed, so sequences admitted in the same step find them (the
`owner` computes them; the scheduler makes others wait for or share that work). Blocks filled by decoding are
registered once their KV is computed, which lets a resubmitted prompt + continuation reuse them.
Unreferenced blocks stay cached in LRU order until their space is needed. Knows nothing of tensors: copy-on-write
returns (src, dst) pairs for the runner to copy.
"""
from __future__ import annotations

from collections import OrderedDict

from prmkern.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "prev_hash", "token_ids", "computed", "owner")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.reset()

    def reset(self) -> None:
        self.ref_count = 0
        self.hash: int | None = None
        self.prev_hash: int | None = None  # with token_ids, what the hash stands for (checked on lookup)
        self.token_ids: tuple[int, ...] = ()
        self.computed = False  # the KV of all block_size tokens is in the cache
        self.owner: int | None = None  # seq_id that will compute this registered, not yet computed block


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.hash_to_block: dict[int, int] = {}
        # Bumped whenever a reference count changes, so per-step readers of "which blocks are shared" can cache.
        self.sharing_epoch = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- reference counting -------------------------------------------------------------------------------------
    def _take_free_block(self) -> Block:
        block_id, _ = self._free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        self._forget_hash(block)
        block.reset()
        block.ref_count = 1
        return block

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash = None

    def _ref(self, block: Block) -> None:
        self.sharing_epoch += 1
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _unref(self, block: Block, seq_id: int) -> None:
        assert block.ref_count > 0, f"block {block.block_id} freed twice"
        self.sharing_epoch += 1
        if block.owner == seq_id:
            block.owner = None
        block.ref_count -= 1
        if block.ref_count == 0:
            if not block.computed:
                self._forget_hash(block)  # registered but never computed: useless to a later lookup
            self._free[block.block_id] = None

    def _register(self, block: Block, prev_hash: int | None, token_ids: tuple[int, ...]) -> None:
        block.hash = chain_hash(prev_hash, token_ids)
        block.prev_hash = prev_hash
        block.token_ids = token_ids
        self.hash_to_block.setdefault(block.hash, block.block_id)

    def _lookup(self, prev_hash: int | None, token_ids: tuple[int, ...]) -> Block | None:
        block_id = self.hash_to_block.get(chain_hash(prev_hash, token_ids))
        if block_id is None:
            return None
        block = self.blocks[block_id]
        # Guard against hash collisions: the block must hold these tokens after the same predecessor.
        return block if block.token_ids == token_ids and block.prev_hash == prev_hash else None

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block (vLLM's reset_prefix_cache): False, and nothing forgotten, while a sequence
        holds blocks; the engine must be idle."""
        if any(b.ref_count for b in self.blocks):
            return False
        self.hash_to_block.clear()
        for block in self.blocks:
            block.reset()
        self.sharing_epoch += 1
        return True

    # -- sequences ------------------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens. Leading full blocks come from the prefix cache where
        they match; new full blocks are registered at once with `seq` as their owner. False if the pool is short."""
        assert not seq.block_table, f"{seq} already holds blocks"
        bs = self.block_size
        num_full = seq.num_tokens // bs
        hits: list[Block] = []
        prev: int | None = None
        if self.enable_prefix_caching:
            for i in range(num_full):
                block = self._lookup(prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
                if block is None:
                    break
                hits.append(block)
                prev = block.hash
        num_new = self.blocks_for(seq.num_tokens) - len(hits)
        revived = sum(1 for b in hits if b.ref_count == 0)
        if num_new + revived > self.num_free_blocks:
            return False
        for block in hits:
            self._ref(block)
            seq.block_table.append(block.block_id)
        for i in range(len(hits), len(hits) + num_new):
            block = self._take_free_block()
            if self.enable_prefix_caching and i < num_full:
                self._register(block, prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
                block.owner = seq.seq_id
                prev = block.hash
            seq.block_table.append(block.block_id)
        return True

    def free(self, seq: Sequence) -> None:
        # Tail first, so a prefix outlives its continuations in the LRU order.
        for block_id in reversed(seq.block_table):
            self._unref(self.blocks[block_id], seq.seq_id)
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (a copy of `parent`'s tokens and block table) now shares every block."""
        self.sharing_epoch += 1
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Make the slot of the sequence's newest token writable: a new block when the table is full, a private
        copy when its tail block is shared. Returns copy-on-write (src, dst) pairs, or None if the pool is empty."""
        pos = seq.num_tokens - 1
        if pos // self.block_size >= len(seq.block_table):
            if not self._free:
                return None
            seq.block_table.append(self._take_free_block().block_id)
            return []
        tail = self.blocks[seq.block_table[-1]]
        if tail.ref_count == 1:
            return []
        if not self._free:
            return None
        # Shared tail: copy it. If it is a registered block this sequence was to compute, the registration and the
        # duty move to the copy; the other holders find the original unowned and compute it themselves.
        new = self._take_free_block()
        tail.ref_count -= 1
        self.sharing_epoch += 1
        if not tail.computed and tail.hash is not None and tail.owner == seq.seq_id:
            new.hash, new.prev_hash, new.token_ids, new.owner = tail.hash, tail.prev_hash, tail.token_ids, seq.seq_id
            if self.hash_to_block.get(tail.hash) == tail.block_id:
                self.hash_to_block[tail.hash] = new.block_id
            tail.hash, tail.owner = None, None
        seq.block_table[-1] = new.block_id
        return [(tail.block_id, new.block_id)]

    # -- pins (verification sessions keep their conversations' KV) ------------------------------------------------
    def pin(self, token_ids: list[int]) -> list[int]:
        """Takes a reference to each leading full block of `token_ids` that the prefix cache holds computed, so LRU
        eviction cannot reuse it while pinned; returns their ids, for unpin(). Blocks not (or no longer) cached
        stop the walk: a pin never computes anything."""
        if not self.enable_prefix_caching:
            return []
        bs, prev, pinned = self.block_size, None, []
        for i in range(len(token_ids) // bs):
            block = self._lookup(prev, tuple(token_ids[i * bs:(i + 1) * bs]))
            if block is None or not block.computed:
                break
            self._ref(block)
            pinned.append(block.block_id)
            prev = block.hash
        return pinned

    def pin_blocks(self, block_ids: list[int]) -> None:
        """Another reference to blocks already pinned (a forked session shares its parent's pins)."""
        for block_id in block_ids:
            assert self.blocks[block_id].ref_count > 0, f"block {block_id} is not pinned"
            self._ref(self.blocks[block_id])

    def unpin(self, block_ids: list[int]) -> None:
        """Drops the references pin() took; unreferenced blocks go back to the LRU cache (still reusable)."""
        for block_id in reversed(block_ids):
            self._unref(self.blocks[block_id], -1)

    def is_computed(self, block_id: int) -> bool:
        return self.blocks[block_id].computed

    def owner(self, block_id: int) -> int | None:
        return self.blocks[block_id].owner

    def mark_computed(self, seq: Sequence, old_computed: int) -> None:
        """After a forward pass moved seq.num_computed_tokens up from `old_computed`: flag blocks now full of KV,
        registering decode-filled ones in the prefix cache."""
        bs = self.block_size
        for i in range(old_computed // bs, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.computed:
                continue
            block.computed = True
            block.owner = None
            if block.hash is None and self.enable_prefix_caching:
                prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
                if i == 0 or prev is not None:
                    self._register(block, prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
