"""shared_prefix_decode against the float64 reference over each group's prefix, and the whole cascade
(shared prefix + paged_decode over each chain's suffix + merge_states) against plain attention over the
concatenated KV, both the float64 reference and paged_decode over the full block tables."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import (DEVICE, assert_close, assert_lse_close, dtype_params, make_cascade, nan_like,
                                    ref_paged_decode)

from prmkern.kernels import merge_states, paged_decode, shared_prefix_decode

# (groups [(prefix_blocks, suffix lens per chain)], block_size, num_heads, num_kv_heads, head_dim, num_splits)
CASES = [
    ([(2, [1, 17, 5]), (0, [9]), (1, [33, 2])], 16, 4, 4, 64, 1),   # a lone sequence (prefix 0) between groups
    ([(17, [3, 1, 4, 6])], 1, 8, 2, 64, 3),                          # block size 1, prefix split 3 ways
    ([(3, [1, 16]), (1, [7])], 16, 8, 1, 128, 2),                   # GQA 8: 16 rows per tile, head dim 128
    ([(2, [5] * 11)], 16, 12, 2, 128, None),  # 66 rows: fp32 two row tiles of 64 (fp16 one of 128), split by rule
]


def _run_prefix(case, dtype, out_dtype):
    groups, block_size, num_heads, num_kv_heads, head_dim, num_splits = case
    meta = make_cascade(groups, block_size, num_kv_heads, head_dim, dtype, seed=7)
    batch = meta["group_starts_list"][-1]
    q = torch.randn(batch, num_heads, head_dim, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    out = nan_like((batch, num_heads, head_dim), out_dtype)
    lse = nan_like((batch, num_heads), torch.float32)
    shared_prefix_decode(q=q, k_cache=meta["k_cache"], v_cache=meta["v_cache"], group_starts=meta["group_starts"],
                         prefix_lens=meta["prefix_lens"], prefix_block_tables=meta["prefix_block_tables"],
                         scale=head_dim ** -0.5, max_group_size=meta["max_group_size"],
                         max_prefix_len=meta["max_prefix_len"], num_splits=num_splits, out=out, lse_out=lse)
    return meta, q, out, lse


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES)
def test_shared_prefix_state_matches_reference(dtype, case):
    meta, q, out, lse = _run_prefix(case, dtype, dtype)
    starts, plens = meta["group_starts_list"], meta["prefix_lens_list"]
    rows = [g for g in range(len(plens)) for _ in range(starts[g + 1] - starts[g])]  # group of each chain
    tables = meta["prefix_block_tables"][rows]
    ref_out, ref_lse = ref_paged_decode(q, meta["k_cache"], meta["v_cache"], tables, [plens[g] for g in rows],
                                        q.shape[-1] ** -0.5)
    assert_close(out, ref_out, dtype, "shared_prefix_decode out")
    assert_lse_close(lse, ref_lse, "shared_prefix_decode lse")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", CASES[:3])
def test_cascade_equals_attention_over_concatenated_kv(dtype, case):
    """prefix state (float32) + suffix state from paged_decode (float32) merged == attention over prefix+suffix."""
    meta, q, p_out, p_lse = _run_prefix(case, dtype, torch.float32)
    batch, num_heads, head_dim = q.shape
    scale = head_dim ** -0.5
    s_out, s_lse = paged_decode(q=q, k_cache=meta["k_cache"], v_cache=meta["v_cache"],
                                block_tables=meta["suffix_block_tables"], seq_lens=meta["suffix_lens"], scale=scale,
                                num_splits=2, out=nan_like((batch, num_heads, head_dim), torch.float32))
    out = nan_like((batch, num_heads, head_dim), dtype)
    lse = nan_like((batch, num_heads), torch.float32)
    merge_states(out_a=s_out, lse_a=s_lse, out_b=p_out, lse_b=p_lse, out=out, lse_out=lse)

    ref_out, ref_lse = ref_paged_decode(q, meta["k_cache"], meta["v_cache"], meta["block_tables"],
                                        meta["seq_lens_list"], scale)
    assert_close(out, ref_out, dtype, "cascade out")
    assert_lse_close(lse, ref_lse, "cascade lse")
    plain_out, plain_lse = paged_decode(q=q, k_cache=meta["k_cache"], v_cache=meta["v_cache"],
                                        block_tables=meta["block_tables"], seq_lens=meta["seq_lens"], scale=scale,
                                        max_seq_len=meta["max_seq_len"])
    assert_close(out, plain_out, dtype, "cascade vs plain paged_decode", scale=2.0)
    assert_lse_close(lse, plain_lse, "cascade vs plain paged_decode lse")
