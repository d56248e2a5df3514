"""TritonBackend against TorchBackend (the reference backend) on random metadata: store_kv, prefill, decode on the
plain path, the shared-prefix path and a mix of both (thresholds that select some groups only), and the
elementwise methods; plus its threshold validation and the path choice itself."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, assert_close, assert_lse_close, dtype_params, make_cascade, make_paged_kv

from prmkern.attention.backend import BACKENDS, get_backend
from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata
from prmkern.attention.torch_backend import TorchBackend
from prmkern.attention.triton_backend import TritonBackend

META_FIELDS = ("seq_lens", "block_tables", "group_starts", "prefix_lens", "prefix_block_tables", "suffix_lens",
               "suffix_block_tables", "max_seq_len", "max_prefix_len", "max_suffix_len", "group_starts_list",
               "prefix_lens_list")

# Groups: [(prefix blocks, [suffix len per chain])] with block size 16: a 4-chain group over 48 prefix tokens,
# a lone sequence, a 2-chain group over 16 prefix tokens, a 3-chain group over 32.
GROUPS = [(3, [1, 17, 5, 30]), (0, [21]), (1, [3, 9]), (2, [33, 1, 8])]


def _decode_meta(dtype, num_kv_heads, head_dim, block_size=16, groups=GROUPS):
    c = make_cascade(groups, block_size, num_kv_heads, head_dim, dtype, seed=11)
    return c["k_cache"], c["v_cache"], DecodeMetadata(**{f: c[f] for f in META_FIELDS})


def test_registered_and_thresholds_validated():
    assert BACKENDS["triton"] is TritonBackend
    assert isinstance(get_backend("triton"), TritonBackend)
    with pytest.raises(ValueError, match="min_chains"):
        TritonBackend(min_chains=0)
    with pytest.raises(ValueError, match="min_prefix_tokens"):
        TritonBackend(min_prefix_tokens=0)
    _, _, meta = _decode_meta(torch.float32, 1, 64)
    assert TritonBackend(min_chains=3, min_prefix_tokens=32).shared_groups(meta) == [0, 3]
    assert TritonBackend(min_chains=2, min_prefix_tokens=1).shared_groups(meta) == [0, 2, 3]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("min_chains,min_prefix_tokens,num_heads,num_kv_heads,head_dim", [
    (1, 1, 8, 2, 64),          # every group with a prefix shares
    (3, 32, 4, 4, 64),         # groups 0 and 3 share, group 2 runs plain over its full KV
    (100, 10_000, 8, 1, 128),  # nothing shares: plain paged_decode
])
def test_decode_matches_torch_backend(dtype, min_chains, min_prefix_tokens, num_heads, num_kv_heads, head_dim):
    k_cache, v_cache, meta = _decode_meta(dtype, num_kv_heads, head_dim)
    batch = meta.group_starts_list[-1]
    q = torch.randn(batch, num_heads, head_dim, generator=torch.Generator().manual_seed(12)).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    backend = TritonBackend(min_chains=min_chains, min_prefix_tokens=min_prefix_tokens)
    out, lse = backend.decode_states(q, k_cache, v_cache, meta, scale)
    # The torch reference gathers with NaN-free caches only (0 x NaN = NaN in its padded matmul).
    k0, v0 = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref_out, ref_lse = TorchBackend().decode_states(q, k0, v0, meta, scale)
    assert_close(out, ref_out, dtype, "decode_states out")
    assert_lse_close(lse, ref_lse, "decode_states lse")
    final = backend.decode(q, k_cache, v_cache, meta, scale)
    assert final.dtype == dtype
    assert_close(final, ref_out, dtype, "decode out")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [(16, 12, 2, 64), (1, 4, 1, 128)])
def test_store_kv_then_prefill_matches_torch_backend(dtype, block_size, num_heads, num_kv_heads, head_dim):
    """A prefill step as the model runs it: store the new tokens' K/V, then attend (cached prefix + new)."""
    seq_lens, q_lens = [23, 6, 17], [23, 2, 9]  # fresh prompt, extension by 2 after 4, by 9 after 8 cached
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=13)
    g = torch.Generator().manual_seed(14)
    num_tokens = sum(q_lens)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    slots = []
    for s, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        slots += [int(tables[s, p // block_size]) * block_size + p % block_size for p in range(n - ql, n)]
    slots[1] = -1  # a token not stored (its old cache entry stays)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    meta = PrefillMetadata(cu_seqlens_q=torch.tensor([0, 23, 25, 34], dtype=torch.int32, device=DEVICE),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
                           max_q_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype).to(DEVICE)

    tri, ref = TritonBackend(), TorchBackend()
    kt, vt = k_cache.clone(), v_cache.clone()
    kr, vr = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    tri.store_kv(key, value, kt, vt, slot_mapping)
    ref.store_kv(key, value, kr, vr, slot_mapping)
    assert torch.equal(kt.nan_to_num(0.0), kr) and torch.equal(vt.nan_to_num(0.0), vr)
    out = tri.prefill(q, kt, vt, meta, head_dim ** -0.5)
    expected = ref.prefill(q, kr, vr, meta, head_dim ** -0.5)
    assert_close(out, expected.double(), dtype, "prefill vs torch backend", scale=2.0)


@pytest.mark.parametrize("dtype", dtype_params())
def test_elementwise_methods_match_torch_backend(dtype):
    g = torch.Generator().manual_seed(15)
    tri, ref = TritonBackend(), TorchBackend()
    x = torch.randn(5, 96, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(5, 96, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype).to(DEVICE)
    for res in (None, residual):
        n_t, r_t = tri.rms_norm(x, weight, 1e-6, res)
        n_r, r_r = ref.rms_norm(x, weight, 1e-6, res)
        assert_close(n_t, n_r.double(), dtype, "rms_norm vs torch backend", scale=4.0)
        assert (r_t is None) == (r_r is None) and (r_t is None or torch.equal(r_t, r_r))

    cache = torch.cat((torch.rand(40, 32) * 2 - 1, torch.rand(40, 32) * 2 - 1), dim=1).to(DEVICE)  # [40, 64]
    positions = torch.tensor([0, 39, 7, 7, 21], device=DEVICE)
    q = torch.randn(5, 6, 64, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(5, 2, 64, generator=g).to(dtype).to(DEVICE)
    q_r, k_r = ref.apply_rotary(q, k, positions, cache)
    q_t, k_t = tri.apply_rotary(q.clone(), k.clone(), positions, cache)
    assert_close(q_t, q_r.double(), dtype, "rotary q vs torch backend", scale=2.0)
    assert_close(k_t, k_r.double(), dtype, "rotary k vs torch backend", scale=2.0)

    h = torch.randn(3, 2 * 50, generator=g).to(dtype).to(DEVICE)
    assert_close(tri.silu_and_mul(h), ref.silu_and_mul(h).double(), dtype, "silu_and_mul vs torch backend",
                 scale=4.0)


def test_engine_on_triton_backend_gives_torch_backend_tokens(qwen2_dir, monkeypatch):
    """The whole engine (tiny Qwen2, GQA 3) on the Triton backend under the interpreter: the same greedy tokens as
    on the torch backend, for two prompts with 3 chains each and one single chain; thresholds lowered so the
    shared-prefix path is taken (checked), since the tiny prompts are far below the default thresholds."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    taken: list[list[int]] = []

    class Recording(TritonBackend):
        def __init__(self):
            super().__init__(min_chains=2, min_prefix_tokens=8)

        def shared_groups(self, meta):
            groups = super().shared_groups(meta)
            taken.append(groups)
            return groups

    monkeypatch.setitem(BACKENDS, "triton", Recording)
    prompts = random_prompts([40, 7, 21], 509, seed=3)
    params = [SamplingParams(temperature=1.0, top_k=1, max_tokens=6, ignore_eos=True, n=n) for n in (3, 1, 3)]

    def run(backend: str) -> list[list[list[int]]]:
        llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, attention_backend=backend, block_size=8)
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]

    assert run("triton") == run("torch")
    assert any(len(g) == 2 for g in taken), f"the shared-prefix path was never taken for both groups: {taken}"
