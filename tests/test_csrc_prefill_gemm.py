"""prmkern._C.prefill_linear (csrc/prefill_gemm.cpp), the blocked prefill GEMM, against float64: odd row, output and
depth counts (partial 6 x 16 tiles, depths across several 256-blocks, outputs across several 1536-blocks), fp32 /
bf16 / fp16 weights, bias or none, fp32 and bf16 activations; the bound is the classic one for a float32 sum of K
products and a bias, (K + 1) * 2^-23 * (|x| @ |w|^T + |b|), not a loose tolerance. Also the portable path (PRMKERN_ISA=scalar) and the
engine's prefill through it against transformers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OPS = pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
if not hasattr(OPS, "prefill_linear"):
    pytest.skip("prmkern._C was built before csrc/ had prefill_linear: rebuild it (python setup.py build_ext --inplace)",
                allow_module_level=True)
ROOT = Path(__file__).resolve().parents[1]


def check(M: int, K: int, N: int, wdtype: torch.dtype, xdtype: torch.dtype = torch.float32, bias: bool = True,
          seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(xdtype)
    w = torch.randn(N, K, generator=g).to(wdtype)
    b = torch.randn(N, generator=g) if bias else None
    y = OPS.prefill_linear(x, w, b)
    assert y.dtype == xdtype and y.shape == (M, N)
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (b.double() if bias else 0)
    bound = (K + 1) * 2.0 ** -23 * (xd.abs() @ wd.abs().T + (b.double().abs() if bias else 0)) + 1e-30
    if xdtype != torch.float32:  # one rounding of the result to xdtype besides
        bound = bound + ref.abs() * torch.finfo(xdtype).eps
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all() and (err <= bound).all(), (
        f"M={M} K={K} N={N} {wdtype}: worst error {(err - bound).max().item():.3g} over its bound")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 13, 17), (13, 300, 33), (200, 600, 1600), (6, 256, 16),
                                   (97, 257, 1537)])
def test_matches_float64(M, K, N, wdtype):
    check(M, K, N, wdtype, seed=M + K + N)


def test_bf16_activations_and_no_bias():
    check(130, 96, 50, torch.bfloat16, xdtype=torch.bfloat16, bias=False)


def test_errors_name_the_shapes():
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\] and weight \[N, K\]"):
        OPS.prefill_linear(torch.zeros(3, 4), torch.zeros(5, 6))
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        OPS.prefill_linear(torch.zeros(3, 4), torch.zeros(4, 5).T)


def test_portable_path():
    """PRMKERN_ISA=scalar: what a CPU without AVX2 runs, against float64 with the same bound."""
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "from prmkern import _C; assert _C.cpu_isa() == 'scalar'\n"
            "from test_csrc_prefill_gemm import check\n"
            "for wd in ('float32', 'bfloat16'):\n"
            "    import torch; check(19, 300, 37, getattr(torch, wd))\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300,
                   env=dict(os.environ, PRMKERN_ISA="scalar", OMP_NUM_THREADS="2"))
