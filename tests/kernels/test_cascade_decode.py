"""The fused cascade decode (kernels/cascade_decode.py: prefix + suffix + in-kernel last-arriver reduce, one launch)
against float64 attention over each chain's concatenated prefix + suffix KV, with outputs poisoned by NaN (every
row must be written), the arrival counters left zero, and its split rule's state-bytes budget."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import (DEVICE, assert_close, assert_lse_close, dtype_params, make_cascade, nan_like,
                                    ref_paged_decode)

from prmkern.kernels.cascade_decode import STATE_BUDGET, cascade_decode, cascade_splits

# (groups [(prefix_blocks, suffix lens per chain)], block_size, num_heads, num_kv_heads, head_dim, splits (P, S))
CASES = [
    ([(2, [1, 17, 5]), (0, [9]), (1, [33, 2])], 16, 4, 4, 64, (1, 1)),  # a lone row (prefix 0) between groups
    ([(17, [3, 1, 4, 6])], 1, 8, 2, 64, (3, 2)),                         # block size 1, both halves split
    ([(3, [1, 16]), (1, [7])], 16, 12, 2, 128, None),                   # GQA 6, head dim 128, split by rule
    ([(2, [5] * 11), (1, [0, 4])], 16, 12, 2, 64, (2, 3)),  # 66 rows of one group: several row tiles; empty suffix
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES)
def test_cascade_decode_matches_reference(dtype, case):
    groups, block_size, num_heads, num_kv_heads, head_dim, splits = case
    meta = make_cascade(groups, block_size, num_kv_heads, head_dim, dtype, seed=11)
    batch = meta["group_starts_list"][-1]
    q = torch.randn(batch, num_heads, head_dim, generator=torch.Generator().manual_seed(12)).to(dtype).to(DEVICE)
    counters = torch.zeros(batch * num_heads, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    for _ in range(2):  # twice: the counters the first launch leaves must serve the second
        out = nan_like((batch, num_heads, head_dim), dtype)
        lse = nan_like((batch, num_heads), torch.float32)
        cascade_decode(q=q, k_cache=meta["k_cache"], v_cache=meta["v_cache"], group_starts=meta["group_starts"],
                       prefix_lens=meta["prefix_lens"], prefix_block_tables=meta["prefix_block_tables"],
                       suffix_lens=meta["suffix_lens"], suffix_block_tables=meta["suffix_block_tables"], scale=scale,
                       max_group_size=meta["max_group_size"], max_prefix_len=meta["max_prefix_len"],
                       max_suffix_len=meta["max_suffix_len"], splits=splits, out=out, lse_out=lse,
                       counters=counters)
        assert int(counters.abs().sum()) == 0, "arrival counters not reset"
        ref_out, ref_lse = ref_paged_decode(q, meta["k_cache"], meta["v_cache"], meta["block_tables"],
                                            meta["seq_lens_list"], scale)
        assert_close(out, ref_out, dtype, "cascade_decode out")
        assert_lse_close(lse, ref_lse, "cascade_decode lse")


def test_cascade_decode_rejects_bad_input():
    meta = make_cascade([(1, [3, 4])], 16, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64, device=DEVICE)
    kw = dict(q=q, k_cache=meta["k_cache"], v_cache=meta["v_cache"], group_starts=meta["group_starts"],
              prefix_lens=meta["prefix_lens"], prefix_block_tables=meta["prefix_block_tables"],
              suffix_lens=meta["suffix_lens"], suffix_block_tables=meta["suffix_block_tables"], scale=0.1,
              max_group_size=2)
    for bad in ((0, 1), 3, (1, 2, 3), (1.0, 1)):
        with pytest.raises(ValueError, match="splits"):
            cascade_decode(**kw, splits=bad)
    with pytest.raises(ValueError, match="max_group_size"):
        cascade_decode(**{**kw, "max_group_size": 0})
    empty = torch.empty(0, 4, 64, device=DEVICE)  # an empty batch returns empty outputs
    out, lse = cascade_decode(**{**kw, "q": empty, "suffix_lens": kw["suffix_lens"][:0],
                                 "suffix_block_tables": kw["suffix_block_tables"][:0], "max_group_size": 0})
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    with pytest.raises(TypeError, match="int32"):
        cascade_decode(**{**kw, "suffix_lens": meta["suffix_lens"].long()})
    with pytest.raises(ValueError, match="counters"):
        cascade_decode(**kw, counters=torch.zeros(3, dtype=torch.int32, device=DEVICE))


def test_cascade_splits_budget():
    """At the goal shape (8K prefix x 64 chains x 256 suffix, GQA 6, 2 KV heads, head dim 128, bf16) on 132 SMs the
    rule keeps partial-state bytes <= STATE_BUDGET of the KV bytes and still splits the prefix for parallelism."""
    p, s = cascade_splits(batch=64, num_groups=1, num_kv_heads=2, group=6, head_dim=128, itemsize=2, row_tiles=6,
                          max_prefix_len=8192, max_suffix_len=256, sms=132)
    kv = (8192 + 64 * 256) * 2 * 128 * 2 * 2
    state = (p + s) * 64 * 12 * (128 * 4 + 4)
    assert state <= STATE_BUDGET * kv and p >= 2 and s >= 1, (p, s, state / kv)
    # a small step is not split at all (each split would hold fewer than MIN_SPLIT_TOKENS keys)
    assert cascade_splits(batch=4, num_groups=1, num_kv_heads=2, group=6, head_dim=128, itemsize=2, row_tiles=1,
                          max_prefix_len=128, max_suffix_len=32, sms=132) == (1, 1)
