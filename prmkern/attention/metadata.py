"""Batch metadata that the runner builds once per step and every attention backend reads.

Knows nothing of sequences or the scheduler: only tensors and ints, so kernels and backends can be tested
without an engine. Conventions shared by every backend (torch reference, Triton):

- KV cache, one pair per layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads, head_dim].
- A slot is `block_id * block_size + offset`; `slot_mapping[t] = -1` means "do not store token t".
- Block tables are int32 [num_seqs, max_blocks], padded with -1 past each sequence's blocks.
- Partial softmax states are (out [.., num_heads, head_dim] in the query dtype, lse [.., num_heads] float32,
  natural log); an empty key range has lse = -inf and out = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillMetadata:
    """New tokens of several sequences (chunked prefill, or extension after a prefix-cache hit).

    The new tokens' K/V are stored into the cache before attention, so attention reads every key from the cache.
    Query token i of sequence s sits at position `seq_lens[s] - q_lens[s] + i` and sees keys 0..that position.
    """

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1], offsets of each sequence's new tokens in the batch
    seq_lens: torch.Tensor  # int32 [num_seqs], total KV length (cached prefix + new tokens)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    max_q_len: int
    max_seq_len: int


@dataclass
class DecodeMetadata:
    """One new token per sequence, split into shared-prefix groups (cascade attention).

    Sequences are ordered by group: the chains of group g are rows `group_starts[g]:group_starts[g+1]`. Group g's
    chains share `prefix_lens[g]` leading tokens (whole blocks, `prefix_block_tables[g]`); each chain's own suffix
    is `suffix_lens[b]` tokens in `suffix_block_tables[b]`. A sequence alone in its group has prefix length 0 and
    its whole KV as suffix. `block_tables`/`seq_lens` describe the same KV without the split (plain paged decode).
    """

    seq_lens: torch.Tensor  # int32 [batch]
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    group_starts: torch.Tensor  # int32 [num_groups + 1]
    prefix_lens: torch.Tensor  # int32 [num_groups], multiples of block_size
    prefix_block_tables: torch.Tensor  # int32 [num_groups, max_prefix_blocks]
    suffix_lens: torch.Tensor  # int32 [batch]
    suffix_block_tables: torch.Tensor  # int32 [batch, max_suffix_blocks]
    max_seq_len: int
    max_prefix_len: int
    max_suffix_len: int
    # Host copies of group boundaries, so a backend can pick a path per group without a device sync.
    group_starts_list: list[int]
    prefix_lens_list: list[int]
    # Set only for a decode step captured in a CUDA graph (prmkern/engine/cuda_graphs.py), where nothing may depend on this
    # step's values: `cascade` fixes the path for every row (True: suffix + shared-prefix states merged, a group with
    # prefix length 0 contributing an empty state; False: plain paged decode), `max_group_size` sizes the
    # shared-prefix grid, and the split counts are fixed (plain: num_splits; cascade: prefix_num_splits = P and
    # num_splits = S of the fused cascade_decode, or both None for that kernel's own rule applied to the fixed host
    # max lengths). None: the backend decides from the values above.
    cascade: bool | None = None
    max_group_size: int | None = None
    num_splits: int | None = None
    prefix_num_splits: int | None = None

    def cascade_tables_int32(self) -> tuple[torch.Tensor, ...]:
        """(group_starts, prefix_lens, prefix_block_tables, suffix_lens, suffix_block_tables) as contiguous int32,
        the C++ kernels' layout; converted once per step (this object lives one step) and shared by every layer."""
        tables = self.__dict__.get("_int32_tables")
        if tables is None:
            tables = tuple(t.to(torch.int32).contiguous() for t in (
                self.group_starts, self.prefix_lens, self.prefix_block_tables, self.suffix_lens,
                self.suffix_block_tables))
            self.__dict__["_int32_tables"] = tables
        return tables


@dataclass
class AttentionMetadata:
    """Exactly one of `prefill` and `decode` is set: a step is either a prefill/extend step or a decode step."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    prefill: PrefillMetadata | None = None
    decode: DecodeMetadata | None = None
    all_slots_valid: bool = False  # host flag: no slot is -1 (set for eager decode steps)
