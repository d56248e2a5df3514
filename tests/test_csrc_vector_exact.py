"""The 8-lane AVX2 paths of the elementwise kernels and the rotary KV store (csrc/elementwise.cpp,
csrc/rotary_store.cpp, with csrc/vec8.h's conversions) equal the portable paths bit for bit: the same inputs run in
this process (this CPU's widest path) and in a subprocess with PRMKERN_ISA=scalar, and every output byte must match
(compared as integers; NaNs must be NaN in the same places, their sign and payload are not specified by IEEE or
torch and differ with operand order). SiLU-and-mul is the exception by design: its AVX2 path computes exp with a
polynomial (~2e-7 relative), so it must stay within 4 float32 ulps (1 bf16 ulp) of the portable std::exp. Inputs have widths with tails (H % 8 != 0), values that round to bf16 / f16
ties, overflow to inf in f16, subnormals, NaN and inf. The float64 references are in test_csrc_elementwise.py and
test_csrc_decode_step.py; this file checks that the vector code changed no rounding."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OPS = pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(OPS.cpu_isa() == "scalar", reason="no vector path on this CPU")


def _hostile(shape, dtype, seed):
    """Random values at several scales, with exact bf16 / f16 rounding ties, f16 overflow, subnormals and specials
    sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.tensor([1e-6, 1.0, 300.0, 7e4])[
        torch.randint(0, 4, shape, generator=g)].double()
    flat = x.view(-1)
    n = flat.numel()
    pick = torch.randperm(n, generator=g)
    # ties: a float32 whose low 16 bits are exactly 0x8000 (bf16 tie), then one whose low 13 are 0x1000 (f16 tie)
    bits = torch.randint(0, 1 << 15, (n,), generator=g, dtype=torch.int64)
    tie_bf16 = ((bits << 16) | 0x8000).to(torch.int32).view(torch.float32).double()
    tie_f16 = (((bits + 0x3800) << 13) | 0x1000).to(torch.int32).view(torch.float32).double()
    flat[pick[: n // 8]] = tie_bf16[: n // 8]
    flat[pick[n // 8: n // 4]] = tie_f16[: n // 4 - n // 8]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -1e-42, 65519.0, 65520.0, -7e4])
    m = min(len(special), n - n // 4)
    flat[pick[n // 4: n // 4 + m]] = special[:m].double()
    return x.to(dtype)


def _cases():
    """Each op's outputs on fixed hostile inputs: {name: tensor}."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in ((3, 8), (4, 61), (2, 1536), (1, 7)):
            x = _hostile((rows, hidden), dtype, rows * hidden)
            r = _hostile((rows, hidden), dtype, rows * hidden + 1)
            w = (torch.rand(hidden, generator=torch.Generator().manual_seed(hidden)) + 0.5).to(dtype)
            o1, _ = OPS.add_rms_norm(x, None, w, 1e-6)
            o2, res = OPS.add_rms_norm(x, r, w, 1e-5)
            out[f"rms/{dtype}/{rows}x{hidden}"] = o1
            out[f"rms_res/{dtype}/{rows}x{hidden}"] = o2
            out[f"res/{dtype}/{rows}x{hidden}"] = res
            out[f"silu/{dtype}/{rows}x{hidden}"] = OPS.silu_and_mul(torch.cat([x, r], -1))
    for act in (torch.float32, torch.bfloat16, torch.float16):
        for cache_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for head_dim in (16, 20, 64, 128):  # 20: D/2 = 10, a vector of 8 and a tail of 2
                g = torch.Generator().manual_seed(head_dim)
                t, hq, hkv = 5, 4, 2
                qkv = _hostile((t, (hq + 2 * hkv) * head_dim), act, head_dim)
                q, k, v = (a.reshape(t, -1, head_dim) for a in qkv.split(
                    [hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
                cos_sin = torch.randn(40, head_dim, generator=g)
                pos = torch.randint(0, 40, (t,), generator=g)
                slots = torch.tensor([3, 0, -1, 7, 12])
                kc = torch.zeros(4, 4, hkv, head_dim, dtype=cache_dtype)
                vc = torch.zeros_like(kc)
                qo = OPS.rotary_store_kv(q, k, v, pos, cos_sin, kc, vc, slots)
                key = f"rot/{act}/{cache_dtype}/{head_dim}"
                out[key + "/q"], out[key + "/k"], out[key + "/v"] = qo, kc, vc
    return out


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between finite a and b of one float dtype (the same sign
    assumed where they differ by little: integers of the bit patterns)."""
    ia, ib = _as_bits(a).long(), _as_bits(b).long()
    return int((ia - ib).abs().max()) if ia.numel() else 0


def _mismatch(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return True
    nan = torch.isnan(ours.float())
    if not torch.equal(nan, torch.isnan(theirs.float())):
        return True
    a, b = ours[~nan], theirs[~nan]
    if name.startswith("silu/"):
        return _ulps(a, b) > (4 if ours.dtype == torch.float32 else 1)
    return not torch.equal(_as_bits(a), _as_bits(b))


def test_vector_paths_equal_the_portable_paths_bit_for_bit(tmp_path):
    ours = _cases()
    dump = tmp_path / "scalar.pt"
    code = ("import sys, torch\nsys.path.insert(0, 'tests')\nfrom prmkern import _C\n"
            "assert _C.cpu_isa() == 'scalar', _C.cpu_isa()\n"
            "from test_csrc_vector_exact import _cases\n"
            f"torch.save(_cases(), {str(dump)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300,
                   env=dict(os.environ, PRMKERN_ISA="scalar", OMP_NUM_THREADS="1"))
    theirs = torch.load(dump)
    assert ours.keys() == theirs.keys()
    bad = [k for k in ours if _mismatch(k, ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(ours)} outputs differ from the portable path, e.g. {bad[:5]}"
    # the inputs did reach the specials: some NaN and inf made it through to the outputs
    assert any(torch.isnan(v.float()).any() for v in ours.values())
    assert any(torch.isinf(v.float()).any() for v in ours.values())
