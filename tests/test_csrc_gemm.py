"""The C++ decode GEMM (csrc/decode_gemm.cpp) against float64 products: fp32 / bf16 / fp16 weights, row counts on
and off the 3-row (AVX2) and 6-row (AVX-512) tiles, K off the 8- and 16-lane vectors, N off the 4-column tile, bias,
strided weights, every instruction-set level this CPU has (PRMKERN_ISA=scalar / avx2 / avx512, each in a
subprocess), and errors; plus the extension builds wherever a compiler is present."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from prmkern.ops.cpp import cpp_ops

OPS = cpp_ops()
needs_ops = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built_where_it_can_be():
    """On x86-64 Linux with a C++ compiler, scripts/setup_env.sh must have built prmkern._C."""
    if platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("c++") is None:
        pytest.skip("not x86-64 Linux with a compiler")
    if os.environ.get("PRMKERN_DISABLE_CPP") == "1":
        pytest.skip("disabled by PRMKERN_DISABLE_CPP")
    assert OPS is not None, "prmkern._C did not import: run scripts/setup_env.sh (pip install --no-build-isolation)"
    assert OPS.cpu_isa() in ("avx512", "avx2", "scalar")


def _check(M: int, K: int, N: int, wdtype: torch.dtype, xdtype: torch.dtype, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(xdtype)
    w = torch.randn(N, K, generator=g).to(wdtype)
    b = torch.randn(N, generator=g) if bias else None
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    y = OPS.decode_linear(x, w, b)
    assert y.dtype == xdtype and y.shape == (M, N)
    assert not torch.isnan(y).any()
    tol = 2e-5 * K ** 0.5 if xdtype == torch.float32 else 1e-2 * K ** 0.5  # bf16/fp16 outputs are rounded
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=1e-2 if xdtype != torch.float32 else 1e-5)


@needs_ops
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N", [(1, 64, 4), (2, 37, 9), (3, 128, 130), (5, 515, 67), (16, 512, 96),
                                     (17, 9, 3), (64, 200, 33)])
def test_decode_linear_matches_float64(wdtype, M, K, N):
    _check(M, K, N, wdtype, torch.float32, bias=N % 2 == 1, seed=M * 1000 + K)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_linear_low_precision_activations(dtype):
    _check(7, 96, 40, dtype, dtype, bias=True, seed=3)


@needs_ops
def test_strided_weight_rows_and_large_n_threads():
    """A weight whose rows are a slice of wider storage (stride(0) > K), and an N large enough to use threads."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4096, 80, generator=g)
    w = base[:, 3:67]  # [4096, 64], stride (80, 1)
    x = torch.randn(6, 64, generator=g)
    torch.testing.assert_close(OPS.decode_linear(x, w).double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-5)


@needs_ops
def test_errors_name_what_was_given():
    with pytest.raises(RuntimeError, match="K=5"):
        OPS.decode_linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.decode_linear(torch.randn(2, 4), torch.randn(4, 3).t())
    with pytest.raises(RuntimeError, match="accepted"):
        OPS.decode_linear(torch.randn(2, 4), torch.randn(3, 4).double())


_LEVEL_SWEEP = """
import torch
from prmkern import _C
print(_C.cpu_isa())
g = torch.Generator().manual_seed(0)
for wd in (torch.float32, torch.bfloat16, torch.float16):
    for M in (1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 19, 64):
        for K, N in ((77, 13), (16, 4), (512, 9), (33, 8)):
            x = torch.randn(M, K, generator=g); w = torch.randn(N, K, generator=g).to(wd); b = torch.randn(N, generator=g)
            torch.testing.assert_close(_C.decode_linear(x, w, b).double(), x.double() @ w.double().T + b.double(),
                                       atol=1e-4 * K ** 0.5, rtol=1e-5)
"""


@needs_ops
@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_every_isa_level_matches(level):
    """PRMKERN_ISA caps the path: scalar is what a CPU without AVX2 runs, avx2 what one without AVX-512 runs. A
    level this CPU lacks is skipped (the process reports the level it actually ran)."""
    env = dict(os.environ, PRMKERN_ISA=level, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _LEVEL_SWEEP], check=True, env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True).stdout.split()
    if out[0] != level:
        pytest.skip(f"this CPU runs {out[0]}, not {level}")


_BF16_SWEEP = """
import torch
from prmkern import _C
print(_C.bf16_dot())
g = torch.Generator().manual_seed(1)
for M in (1, 2, 5, 6, 7, 12, 16, 17, 64):
    for K, N in ((64, 4), (96, 9), (512, 13), (1408, 8), (37, 5)):
        x = torch.randn(M, K, generator=g).bfloat16(); w = torch.randn(N, K, generator=g).bfloat16()
        b = torch.randn(N, generator=g)
        want = x.double() @ w.double().T + b.double()
        y = _C.decode_linear(x, w, b)
        assert y.dtype == torch.bfloat16
        # float32 accumulation of exact bf16 products, then one rounding of the output to bf16
        torch.testing.assert_close(y.double(), want, atol=1e-4 * K ** 0.5, rtol=2 ** -8)
"""


@needs_ops
@pytest.mark.parametrize("bf16_dot", ["1", "0"])
def test_bf16_activations_dot_product_path(bf16_dot):
    """bf16 x bf16 takes vdpbf16ps on an AVX-512 BF16 CPU (two products per float32 lane); PRMKERN_BF16_DOT=0
    takes the widening path. Both against float64 products of the same bf16 values."""
    env = dict(os.environ, PRMKERN_BF16_DOT=bf16_dot, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _BF16_SWEEP], check=True, env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True).stdout.split()
    if bf16_dot == "1" and out[0] != "True":
        pytest.skip("this CPU has no AVX-512 BF16")
    assert out[0] == ("True" if bf16_dot == "1" else "False")
