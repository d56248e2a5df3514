"""paged_prefill against the float64 causal reference: whole-prompt prefill, extension after a cached prefix,
single-token chunks, block sizes 1 and 16, GQA 1/4/8 (and 6, ThinkPRM's), head dims 64/128, NaN-poisoned output."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import (DEVICE, assert_close, contiguous_kv, dtype_params, make_paged_kv, nan_like,
                                    ref_attention)

from prmkern.kernels import paged_prefill

# (seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim): q_len <= seq_len; seq_len - q_len is cached.
CASES = [
    ([17, 1, 33], [17, 1, 5], 16, 4, 4, 64),     # full prefill, a 1-token sequence, extension by 5 after 28 cached
    ([20, 9], [3, 9], 1, 8, 2, 64),             # block size 1, GQA 4
    ([40], [17], 16, 8, 1, 128),                # GQA 8, head dim 128, 23 cached + 17 new (rows span tiles)
    ([18, 7], [1, 7], 16, 12, 2, 128),          # GQA 6 (not a power of two), a decode-like 1-token chunk
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("seq_lens,q_lens,block_size,num_heads,num_kv_heads,head_dim", CASES)
def test_paged_prefill_matches_reference(dtype, seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim):
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=3)
    g = torch.Generator().manual_seed(2)
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = nan_like((num_tokens, num_heads, head_dim), dtype)

    got = paged_prefill(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu,
                        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
                        scale=scale, max_q_len=max(q_lens), out=out)
    assert got is out

    expected = []
    start = 0
    for s, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        k, v = contiguous_kv(k_cache, v_cache, tables[s].cpu(), n)
        o, _ = ref_attention(q[start:start + ql], k, v, scale, q_pos=list(range(n - ql, n)))
        expected.append(o)
        start += ql
    assert_close(out, torch.cat(expected), dtype, "paged_prefill out")


def test_paged_prefill_grid_larger_than_needed():
    """max_q_len may overestimate (a captured graph's bound): extra tiles do nothing and rows stay correct."""
    seq_lens, q_lens = [5], [5]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 16, 1, 64, torch.float32, seed=4)
    q = torch.randn(5, 2, 64, device=DEVICE)
    out = nan_like((5, 2, 64), torch.float32)
    paged_prefill(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32,
                  device=DEVICE), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                  block_tables=tables, scale=0.125, max_q_len=100, out=out)
    k, v = contiguous_kv(k_cache, v_cache, tables[0].cpu(), 5)
    expected, _ = ref_attention(q, k, v, 0.125, q_pos=list(range(5)))
    assert_close(out, expected, torch.float32, "paged_prefill out (oversized grid)")
