"""The C++ causal prefill attention (`_C.prefill_attention`, csrc/paged_attention.cpp) against float64 attention
written plainly: several sequences in one batch, fresh prompts and new tokens after a cached prefix (query i at
position len - q_len + i), GQA ratios 1 / 4 / 6, head dims 64 / 128 / 80, block sizes 1 / 8 / 16, lengths across the
64-query tile and 32-key chunk edges, fp32 / bf16 / fp16 caches, every instruction-set path this CPU has, and
never-written pool slots holding NaN (a read past a sequence poisons the output)."""
from __future__ import annotations

import pytest
import torch

from prmkern.attention import PrefillMetadata, get_backend
from prmkern.ops.cpp import cpp_ops
from tests.kernels.conftest import contiguous_kv, make_paged_kv, ref_attention

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
ISAS = {"scalar": ["scalar"], "avx2": ["scalar", "avx2"], "avx512": ["scalar", "avx2", "avx512"]}


def reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale):
    """float64, per sequence: scores [Hq, m, n] of its m new tokens against its n keys, query i masked past key
    n - m + i, softmax, @ V (each query head reading its KV head h // G)."""
    outs, start = [], 0
    for s, (n, m) in enumerate(zip(seq_lens, q_lens)):
        k, v = contiguous_kv(k_cache, v_cache, tables[s], n)  # [n, Hkv, D] float64
        qs = q[start:start + m].double().transpose(0, 1)  # [Hq, m, D]
        group = qs.shape[0] // k.shape[1]
        kh = k.transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        vh = v.transpose(0, 1).repeat_interleave(group, 0)
        scores = qs @ kh.transpose(1, 2) * scale  # [Hq, m, n]
        future = torch.arange(n)[None, :] > (n - m + torch.arange(m))[:, None]  # [m, n]
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        outs.append((probs @ vh).transpose(0, 1))  # [m, Hq, D]
        start += m
    return torch.cat(outs)


def test_reference_is_plain_attention():
    """The vectorised reference against conftest's per-query loop on one small case."""
    k_cache, v_cache, tables = make_paged_kv([9, 5], 4, 2, 16, torch.float32, seed=2)
    q = torch.randn(7, 4, 16)
    ours = reference(q, k_cache, v_cache, tables, [9, 5], [4, 3], 0.25)
    loops = []
    for s, (n, m, q0) in enumerate([(9, 4, 0), (5, 3, 4)]):
        k, v = contiguous_kv(k_cache, v_cache, tables[s], n)
        loops.append(ref_attention(q[q0:q0 + m], k, v, 0.25, q_pos=[n - m + i for i in range(m)])[0])
    torch.testing.assert_close(ours, torch.cat(loops), atol=1e-12, rtol=1e-12)


def run(seq_lens, q_lens, block_size, group, head_dim, dtype, isa, seed=0, kv_heads=2):
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, kv_heads, head_dim, dtype, seed=seed)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = head_dim ** -0.5
    out = OPS.prefill_attention(q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, scale,
                                isa)
    assert not torch.isnan(out).any(), "NaN: a never-written (NaN) slot was read"
    return out, reference(q, k_cache, v_cache, tables, seq_lens, q_lens, scale)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, group, head_dim", [(16, 4, 64), (8, 6, 128), (1, 1, 80)])
def test_prefill_attention_matches_float64(isa, dtype, block_size, group, head_dim):
    if isa not in ISAS[OPS.cpu_isa()]:
        pytest.skip(f"this CPU runs up to {OPS.cpu_isa()}")
    # fresh prompts of 1, 17 and 70 tokens (tiles of 64 queries: 16 / 10 / 64 tokens), and 5 / 33 new tokens after
    # cached prefixes of 40 and 100 (the new tokens' first positions off every tile and chunk edge)
    seq_lens, q_lens = [1, 45, 17, 133, 70], [1, 5, 17, 33, 70]
    out, ref = run(seq_lens, q_lens, block_size, group, head_dim, dtype, isa, seed=block_size + group)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5)


def test_long_prompt_and_low_precision_queries():
    """A 300-token prompt (several tiles and key chunks per item, threads taking items by size) and bf16 queries
    (the output follows q's dtype)."""
    k_cache, v_cache, tables = make_paged_kv([300], 16, 2, 64, torch.float32, seed=5)
    q = torch.randn(300, 8, 64).to(torch.bfloat16)
    cu, lens = torch.tensor([0, 300], dtype=torch.int32), torch.tensor([300], dtype=torch.int32)
    out = OPS.prefill_attention(q, k_cache, v_cache, cu, lens, tables, 0.125)
    assert out.dtype == torch.bfloat16
    ref = reference(q, k_cache, v_cache, tables, [300], [300], 0.125)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_backend_prefill_equals_torch_backend():
    """CppBackend.prefill (the engine's path) against the torch backend's SDPA on the same metadata."""
    seq_lens, q_lens = [29, 64], [29, 10]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 16, 2, 64, torch.float32, seed=7)
    q = torch.randn(sum(q_lens), 8, 64)
    meta = PrefillMetadata(cu_seqlens_q=torch.tensor([0, 29, 39], dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables, max_q_len=29,
                           max_seq_len=64)
    ours = get_backend("cpp").prefill(q, k_cache, v_cache, meta, 0.125)
    theirs = get_backend("torch").prefill(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_metadata_errors_say_what_is_accepted():
    k_cache, v_cache, tables = make_paged_kv([20], 16, 2, 64, torch.float32)
    q = torch.randn(20, 8, 64)
    cu, lens = torch.tensor([0, 20], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="heads"):
        OPS.prefill_attention(torch.randn(20, 3, 64), k_cache, v_cache, cu, lens, tables, 0.1)
    with pytest.raises(RuntimeError, match="int32"):
        OPS.prefill_attention(q, k_cache, v_cache, cu.long(), lens, tables, 0.1)
    with pytest.raises(RuntimeError, match="from 0 to T=20"):
        OPS.prefill_attention(q, k_cache, v_cache, torch.tensor([0, 19], dtype=torch.int32), lens, tables, 0.1)
    with pytest.raises(RuntimeError, match="new tokens <= length"):
        OPS.prefill_attention(q, k_cache, v_cache, cu, torch.tensor([19], dtype=torch.int32), tables, 0.1)
    with pytest.raises(RuntimeError, match="table holds"):
        OPS.prefill_attention(q, k_cache, v_cache, cu, torch.tensor([40], dtype=torch.int32), tables, 0.1)
    bad = tables.clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="names block 10000"):
        OPS.prefill_attention(q, k_cache, v_cache, cu, lens, bad, 0.1)
    with pytest.raises(RuntimeError, match="isa='avx9'"):
        OPS.prefill_attention(q, k_cache, v_cache, cu, lens, tables, 0.1, "avx9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_a_tokens_output_does_not_depend_on_its_tile(dtype, group):
    """The same bytes for a token whether its prompt is prefilled whole or after a cached prefix of any length (its
    tile, and so the split between unmasked and masked keys, moves): what lets a data-parallel job write the bytes
    one process writes, whatever its prefix cache held."""
    k_cache, v_cache, tables = make_paged_kv([150], 16, 2, 64, dtype, seed=11)
    q = torch.randn(150, 2 * group, 64, generator=torch.Generator().manual_seed(12))
    lens = torch.tensor([150], dtype=torch.int32)

    def tail(cached: int) -> torch.Tensor:  # outputs of tokens cached .. 149, prefilled after `cached` tokens
        cu = torch.tensor([0, 150 - cached], dtype=torch.int32)
        return OPS.prefill_attention(q[cached:].contiguous(), k_cache, v_cache, cu, lens, tables, 0.125)

    whole = tail(0)
    for cached in (1, 37, 63, 64, 100, 148, 149):
        assert torch.equal(tail(cached), whole[cached:]), f"cached prefix of {cached} tokens"
