"""Every instruction-set level below this CPU's runs the C++ kernels' own tests: the fused elementwise kernels, the
fused decode layer (GEMMs, attention, rotary, norms in one call) and the prefill GEMM, each module re-run in a
subprocess with PRMKERN_ISA capped (scalar: a CPU without AVX2; avx2: an AVX2-only CPU, run where this CPU has
AVX-512). This CPU's own level is what the ordinary test run covers. The GEMM, attention and sampling modules
already run every level themselves (tests/test_csrc_gemm.py, test_csrc_panel_gemm.py, test_csrc_decode_step.py,
test_csrc_prefill_attention.py, test_csrc_sampling.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OPS = pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
ROOT = Path(__file__).resolve().parents[1]
ORDER = ["scalar", "avx2", "avx512"]
LEVELS = ORDER[:ORDER.index(OPS.cpu_isa())]  # the levels below this CPU's
MODULES = ["tests/test_csrc_elementwise.py", "tests/test_csrc_decode_layer.py", "tests/test_csrc_prefill_gemm.py"]


@pytest.mark.parametrize("level", LEVELS or [pytest.param("none", marks=pytest.mark.skip("a scalar-only CPU"))])
def test_kernel_tests_pass_at_capped_level(level):
    env = dict(os.environ, PRMKERN_ISA=level, OMP_NUM_THREADS="2")
    code = f"from prmkern import _C; assert _C.cpu_isa() == {level!r}, _C.cpu_isa()"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *MODULES, "-k",
                           "not portable_path"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"PRMKERN_ISA={level}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
