"""paged_decode against the float64 reference: dtypes, block sizes 1 and 16, GQA 1/4/8, head dims 64/128, odd and
empty lengths, several split counts, NaN-poisoned outputs and NaN in every cache slot no sequence owns."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import (DEVICE, assert_close, assert_lse_close, dtype_params, make_paged_kv, nan_like,
                                    ref_paged_decode)

from prmkern.kernels import paged_decode

# (lens, block_size, num_heads, num_kv_heads, head_dim, num_splits): a covering set, not the Cartesian product.
CASES = [
    ([1, 17, 33], 16, 4, 4, 64, 1),       # GQA 1, single split
    ([33, 5], 1, 8, 2, 64, 3),            # block size 1, GQA 4, splits longer than some sequences
    ([17, 70, 0], 16, 8, 1, 128, 2),      # GQA 8, head dim 128, an empty sequence (lse -inf, out 0)
    ([130], 16, 12, 2, 128, None),        # ThinkPRM's head layout (GQA 6, padded), split by rule
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("lens,block_size,num_heads,num_kv_heads,head_dim,num_splits", CASES)
def test_paged_decode_matches_reference(dtype, lens, block_size, num_heads, num_kv_heads, head_dim, num_splits):
    k_cache, v_cache, tables = make_paged_kv(lens, block_size, num_kv_heads, head_dim, dtype, seed=len(lens))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = nan_like((len(lens), num_heads, head_dim), dtype)
    lse = nan_like((len(lens), num_heads), torch.float32)
    got_out, got_lse = paged_decode(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=seq_lens,
                                    scale=scale, max_seq_len=max(lens), num_splits=num_splits, out=out, lse_out=lse)
    assert got_out is out and got_lse is lse
    ref_out, ref_lse = ref_paged_decode(q, k_cache, v_cache, tables, lens, scale)
    assert_close(out, ref_out, dtype, "paged_decode out")
    assert_lse_close(lse, ref_lse, "paged_decode lse")


def test_paged_decode_float32_partial_state_from_half_inputs():
    """The cascade path keeps the suffix state in float32: out= may be float32 while q is fp16."""
    lens = [20, 3]
    k_cache, v_cache, tables = make_paged_kv(lens, 16, 2, 64, torch.float16, seed=5)
    q = torch.randn(2, 4, 64).half().to(DEVICE)
    out = nan_like((2, 4, 64), torch.float32)
    paged_decode(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                 seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE), scale=0.125, num_splits=2, out=out)
    ref_out, _ = ref_paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, torch.float16, "paged_decode float32 out", scale=0.5)
