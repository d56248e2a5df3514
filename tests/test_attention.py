"""The torch reference backend against float64 attention written plainly (tests/kernels/conftest.py helpers)."""
from __future__ import annotations

import pytest
import torch

from prmkern.attention import DecodeMetadata, PrefillMetadata, get_backend
from tests.kernels.conftest import contiguous_kv, make_cascade, make_paged_kv, ref_attention, ref_paged_decode

TOL = {torch.float32: 3e-5, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size, group", [(1, 1), (16, 4), (8, 8)])
def test_cascade_decode_matches_float64(dtype, block_size, group):
    kv_heads, head_dim = 2, 64
    c = make_cascade([(3, [1, 17, 5]), (0, [9]), (2, [33, 2])], block_size, kv_heads, head_dim, dtype, seed=1)
    meta = DecodeMetadata(**{k: v for k, v in c.items() if k in DecodeMetadata.__dataclass_fields__})
    b = len(c["seq_lens_list"])
    q = torch.randn(b, kv_heads * group, head_dim).to(dtype)
    ref, ref_lse = ref_paged_decode(q, c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens_list"], 0.125)
    out, lse = get_backend("torch").decode_states(q, c["k_cache"], c["v_cache"], meta, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_float64(dtype):
    kv_heads, group, head_dim, bs = 2, 4, 64, 16
    lens, q_lens = [21, 40, 3], [21, 7, 1]  # a fresh prompt, an extension after a cache hit, one token
    k_cache, v_cache, tables = make_paged_kv(lens, bs, kv_heads, head_dim, dtype, seed=2)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = PrefillMetadata(cu_seqlens_q=cu, seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                           max_q_len=max(q_lens), max_seq_len=max(lens))
    out = get_backend("torch").prefill(q, k_cache, v_cache, meta, 0.125)
    for s, (n, m) in enumerate(zip(lens, q_lens)):
        k, v = contiguous_kv(k_cache, v_cache, tables[s], n)
        ref, _ = ref_attention(q[cu[s]:cu[s + 1]], k, v, 0.125, q_pos=list(range(n - m, n)))
        torch.testing.assert_close(out[cu[s]:cu[s + 1]].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
