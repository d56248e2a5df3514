"""The C++ decode-step attention layers against float64 references written plainly: the cascade decode
(csrc/paged_attention.cpp) on every instruction-set path this CPU has (scalar, avx2, avx512) for the shapes that
exercise its work split (several groups, empty prefixes, prefixes not a multiple of the key chunk, one long prefix
split over threads, GQA 1 / 4 / 6, D 64 / 128, fp32 / bf16 / fp16 caches, NaN in every never-written slot), and
the fused rotary + KV store (csrc/rotary_store.cpp) against the torch backend's apply_rotary + store_kv, bit for
bit, and the rotation itself in float64; plus the scalar path forced by PRMKERN_ISA=scalar in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prmkern.attention import get_backend
from prmkern.ops.cpp import cpp_ops
from prmkern.attention.torch_backend import TorchBackend
from tests.kernels.conftest import make_cascade, ref_paged_decode

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
ROOT = Path(__file__).resolve().parents[1]
ISAS = [i for i in ("scalar", "avx2", "avx512") if OPS is not None and
        (i == "scalar" or OPS.cpu_isa() in (i, "avx512"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(c: dict, q: torch.Tensor, scale: float, isa: str) -> torch.Tensor:
    return OPS.cascade_decode(q, c["k_cache"], c["v_cache"], c["group_starts"], c["prefix_lens"],
                              c["prefix_block_tables"], c["suffix_lens"], c["suffix_block_tables"], scale, isa=isa)


def _check(groups, block_size, group, head_dim, dtype, isa, seed=0, kv_heads=2):
    c = make_cascade(groups, block_size, kv_heads, head_dim, dtype, seed=seed)
    q = torch.randn(len(c["seq_lens_list"]), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(seed))
    scale = head_dim ** -0.5
    ref, _ = ref_paged_decode(q, c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens_list"], scale)
    out = _run(c, q, scale, isa)
    assert not torch.isnan(out).any(), f"{isa}: NaN, a never-written (NaN) slot was read"
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5, msg=lambda m: f"{isa} {dtype}: {m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, head_dim", [(1, 64), (4, 64), (6, 128), (4, 128)])
def test_groups_and_empty_prefixes(isa, dtype, group, head_dim):
    """Three groups (3, 5 and 2 chains), a lone chain (empty prefix), prefixes of 3 / 5 / 1 blocks of 8 (24, 40
    and 8 keys: not multiples of the 32-key chunk), suffixes of 1 .. 70 keys."""
    groups = [(3, [1, 17, 5]), (0, [9]), (5, [33, 2, 70, 3, 8]), (1, [4, 6])]
    _check(groups, 8, group, head_dim, dtype, isa, seed=group + head_dim)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_long_prefix_split_over_threads(isa, dtype, kv_heads):
    """One group of 4 chains over a 992-key prefix (62 blocks of 16, 31 key chunks) with 1 or 2 KV heads, on 2 and
    3 threads: with fewer (group, KV head) items than keep the threads busy, the prefix is cut into key ranges
    (2 or 3 here, cut on key-chunk boundaries) merged by log-sum-exp."""
    old = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            _check([(62, [3, 1, 40, 16])], 16, 6, 64, dtype, isa, seed=threads, kv_heads=kv_heads)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS)
def test_block_size_one_and_odd_head_dim(isa):
    """Block size 1 (every key in its own block), head_dim 72 (not a multiple of the 16-lane AVX-512 vector) and 40
    (not of 32), GQA 7."""
    for head_dim in (72, 40):
        _check([(37, [1, 33, 2]), (0, [5])], 1, 7, head_dim, torch.float32, isa, seed=head_dim)


def test_isa_errors():
    c = make_cascade([(1, [3, 4])], 4, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match="accepted"):
        _run(c, torch.randn(2, 4, 64), 0.1, "neon")


def test_scalar_path_in_subprocess():
    """PRMKERN_ISA=scalar forces the portable code (what a CPU without AVX2 runs) for attention and rotary."""
    code = (
        "import torch\n"
        "from prmkern import _C\n"
        "from tests.test_csrc_decode_step import _check, _rotary_case\n"
        "assert _C.cpu_isa() == 'scalar', _C.cpu_isa()\n"
        "torch.set_num_threads(2)\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    _check([(3, [1, 17, 5]), (0, [9]), (40, [3, 2])], 8, 4, 64, dt, '')\n"
        "    _rotary_case(dt, dt, 64, [0, -1, 3])\n")
    env = dict(os.environ, PRMKERN_ISA="scalar")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300)


def test_avx2_cap_in_subprocess():
    """PRMKERN_ISA=avx2 stops at AVX2 (what an AVX2-only CPU runs), and the default path is the widest."""
    if OPS.cpu_isa() == "scalar":
        pytest.skip("no AVX2 on this CPU")
    code = ("from prmkern import _C\nassert _C.cpu_isa() == 'avx2', _C.cpu_isa()\n"
            "from tests.test_csrc_decode_step import _check\nimport torch\n"
            "_check([(3, [1, 17, 5]), (0, [9])], 8, 4, 64, torch.bfloat16, '')\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PRMKERN_ISA="avx2"), cwd=ROOT,
                   timeout=300)


# --- rotary + KV store -------------------------------------------------------------------------------------------

def _rotary_case(act: torch.dtype, cache_dtype: torch.dtype, head_dim: int, slots: list[int], hq=6, hkv=2, seed=0):
    """q, k, v as the decoder has them (views of one fused qkv row), against the torch backend's apply_rotary +
    store_kv (bit for bit) and against a float64 rotation (to the dtype's rounding). Unwritten cache slots hold NaN
    and must stay so."""
    g = torch.Generator().manual_seed(seed)
    t = len(slots)
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, generator=g).to(act)
    q, k, v = (x.reshape(t, -1, head_dim) for x in qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
    cache = torch.randn(50, head_dim, generator=g)  # any float32 [cos | sin] table: the kernel only reads it
    pos = torch.randint(0, 50, (t,), generator=g)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    shape = (8, 4, hkv, head_dim)
    kc, vc = torch.full(shape, float("nan"), dtype=cache_dtype), torch.full(shape, float("nan"), dtype=cache_dtype)
    kr, vr = kc.clone(), vc.clone()
    ours = OPS.rotary_store_kv(q, k, v, pos, cache, kc, vc, slot_mapping)
    tb = TorchBackend()
    q_ref, k_ref = tb.apply_rotary(q, k, pos, cache)
    tb.store_kv(k_ref, v, kr, vr, slot_mapping)
    assert ours.dtype == act and ours.is_contiguous() and ours.shape == q.shape
    assert torch.equal(ours, q_ref), f"rotated q differs from the torch backend ({act})"
    assert torch.equal(kc.isnan(), kr.isnan()) and torch.equal(vc.isnan(), vr.isnan()), "wrote the wrong slots"
    fin = ~kr.isnan()
    assert torch.equal(kc[fin], kr[fin]) and torch.equal(vc[fin], vr[fin]), f"cache differs ({act} -> {cache_dtype})"
    # the rotation itself, in float64
    half = head_dim // 2
    cs = cache[pos].double()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x = q.double()
    want = torch.cat((x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin), -1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[act]
    torch.testing.assert_close(ours.double(), want, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("act", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 6])
def test_rotary_store_matches_torch_backend(act, cache_dtype, head_dim):
    _rotary_case(act, cache_dtype, head_dim, [5, -1, 0, 31, 17, -1, 2])


def test_rotary_store_prefill_threads():
    """A prefill-sized batch (600 tokens: tokens split over threads) with -1 slots scattered."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        slots = [i if i % 7 else -1 for i in range(600)]
        g = torch.Generator().manual_seed(1)
        t, hq, hkv, d = 600, 4, 2, 64
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g)
        q, k, v = (x.reshape(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))
        cache = torch.randn(700, d, generator=g)
        pos = torch.arange(t)
        kc = torch.full((40, 16, hkv, d), float("nan"))
        vc, kr, vr = kc.clone(), kc.clone(), kc.clone()
        sm = torch.tensor(slots)
        ours = OPS.rotary_store_kv(q, k, v, pos, cache, kc, vc, sm)
        tb = TorchBackend()
        q_ref, k_ref = tb.apply_rotary(q, k, pos, cache)
        tb.store_kv(k_ref, v, kr, vr, sm)
        assert torch.equal(ours, q_ref)
        assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
    finally:
        torch.set_num_threads(old)


def test_rotary_store_errors():
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    cache, kc = torch.randn(10, 8), torch.zeros(2, 4, 2, 8)
    pos, sm = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="share one dtype"):
        OPS.rotary_store_kv(q, k.double(), k, pos, cache, kc, kc.clone(), sm)
    with pytest.raises(RuntimeError, match="cos_sin_cache"):
        OPS.rotary_store_kv(q, k, k, pos, cache[:, :4].contiguous(), kc, kc.clone(), sm)
    with pytest.raises(RuntimeError, match="position 10"):
        OPS.rotary_store_kv(q, k, k, torch.tensor([0, 10, 1]), cache, kc, kc.clone(), sm)
    with pytest.raises(RuntimeError, match="slot 8 of a pool of 8"):
        OPS.rotary_store_kv(q, k, k, pos, cache, kc, kc.clone(), torch.tensor([0, 8, 1]))
    with pytest.raises(RuntimeError, match="contiguous heads"):
        OPS.rotary_store_kv(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, pos, cache, kc, kc.clone(), sm)
    with pytest.raises(RuntimeError, match="caches"):
        OPS.rotary_store_kv(q, k, k, pos, cache, kc, kc.half(), sm)


def test_backend_fallback_and_fusion():
    """CppBackend.rotary_store_kv gives the torch pair's result whether it takes the C++ pass or falls back (a
    float64 q, which the kernel does not take)."""
    cpp, ref = get_backend("cpp"), TorchBackend()
    for dt in (torch.float32, torch.float64):
        q, k, v = torch.randn(2, 4, 16).to(dt), torch.randn(2, 2, 16).to(dt), torch.randn(2, 2, 16).to(dt)
        cache, pos, sm = torch.randn(9, 16), torch.tensor([3, 8]), torch.tensor([1, 6])
        kc, vc = torch.zeros(2, 4, 2, 16, dtype=dt), torch.zeros(2, 4, 2, 16, dtype=dt)
        kr, vr = kc.clone(), vc.clone()
        out = cpp.rotary_store_kv(q, k, v, pos, cache, kc, vc, sm, True)
        want = ref.rotary_store_kv(q, k, v, pos, cache, kr, vr, sm, True)
        assert torch.equal(out, want) and torch.equal(kc, kr) and torch.equal(vc, vr)
