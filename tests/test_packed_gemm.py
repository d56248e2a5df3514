"""MKL-packed decode GEMMs (prmkern/models/packed_gemm.py): the packed Linear against a float64 product for row
counts on and off the bucket grid, the bucket/LRU/budget policy, and the engine's tokens with packing on and off."""
from __future__ import annotations

import pytest
import torch

from prmkern.models.packed_gemm import Linear, PackedGemm, bucket_rows, mkl_packing_available

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL packed GEMM")


@pytest.fixture(autouse=True)
def without_cpp_kernels(monkeypatch):
    """MKL packing is the path taken when prmkern's C++ kernels are absent: test it as if they were."""
    from prmkern.ops import extension
    monkeypatch.setattr(extension, "_tried", True)
    monkeypatch.setattr(extension, "_loaded", None)


def test_bucket_rows():
    assert [bucket_rows(r) for r in (1, 3, 4, 8, 9, 16, 17, 256, 257)] == [None, None, 8, 8, 16, 16, 24, 256, None]


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_float64(bias):
    torch.manual_seed(0)
    lin = Linear(96, 200, bias=bias)
    lin.weight.data = lin.weight.data.t().contiguous().t()  # the loader's k-major layout
    pg = PackedGemm(lin, max_bytes=1 << 30, max_buckets=3)
    for rows in (4, 5, 8, 13, 16, 3):
        pg.prepare(rows)
        x = torch.randn(rows, 96)
        want = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
        got = lin(x)
        assert got.shape == (rows, 200)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert sorted(pg.buckets) == [8, 16] and pg.packs_made == 2  # 3 rows: not packed


def test_lru_and_budget():
    lin = Linear(64, 64, bias=False)
    pg = PackedGemm(lin, max_bytes=1 << 30, max_buckets=2)
    for rows in (8, 16, 8, 24):  # 8 is touched again, so 16 is the one evicted
        pg.prepare(rows)
    assert list(pg.buckets) == [8, 24] and set(lin.packed) == {8, 24} and pg.packs_made == 3
    tight = PackedGemm(Linear(64, 64), max_bytes=1000)  # one packed copy (~23 KB) does not fit
    tight.prepare(8)
    assert not tight.buckets and not tight.linears[0].packed
    bf16 = PackedGemm(Linear(64, 64).to(torch.bfloat16), max_bytes=1 << 30)
    bf16.prepare(8)
    assert not bf16.enabled and not bf16.buckets


def test_engine_tokens_with_and_without_packing(qwen2_dir):
    """Six greedy chains over two prompts (decode rows 12 -> bucket 16, then 6 -> bucket 8): the same tokens with
    packed GEMMs as with plain F.linear, and the packs were used."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    prompts = random_prompts([37, 11], 509, seed=4)
    params = [SamplingParams(temperature=1.0, top_k=1, max_tokens=m, ignore_eos=True, n=6) for m in (5, 12)]

    def run(budget: int):
        llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, packed_gemm_bytes=budget)
        out = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        return out, llm.engine.runner.packed_gemm

    want, off = run(0)
    got, on = run(1 << 30)
    assert got == want
    assert off.packs_made == 0 and on.packs_made == 2 and sorted(on.buckets) == [8, 16]
