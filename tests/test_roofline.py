"""benchmarks/roofline.py's ceilings are physical: csrc's micro-kernels run only the instruction sets the CPU has
(PRMKERN_ISA caps them), and nothing measured on this machine beats them: torch's and prmkern's own GEMMs stay
under the FMA peak, an independent read-only sweep under the best read bandwidth; the floors count the work of
a step as written out by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.roofline import (_best, compute_peak, isa_flags, peak_gflops, prefill_counts,  # noqa: E402
                                 read_bandwidth)

OPS = pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
if not hasattr(OPS, "peak_gflops"):
    pytest.skip("prmkern._C was built before csrc/ had peak_gflops: rebuild it (python setup.py build_ext --inplace)",
                allow_module_level=True)
THREADS = torch.get_num_threads()


def _best_rate(fn, work: float, repeats: int = 5) -> float:
    return work / _best(fn, repeats)


def test_peak_kinds_follow_the_cpu():
    """The kinds measured are exactly those /proc/cpuinfo lists (so an AVX2-only CPU never runs AVX-512 code)."""
    flags = isa_flags()
    peaks = peak_gflops(1, repeats=2, seconds=0.002)
    assert ("fma_avx2" in peaks) == (flags["avx2"] and flags["fma"])
    assert ("fma_avx512" in peaks) == flags["avx512f"]
    assert ("bf16_dot" in peaks) == (flags["avx512f"] and flags["avx512_bf16"])
    assert all(v > 0 for k, v in peaks.items() if k != "per_core")


@pytest.mark.parametrize("level,absent", [("scalar", ["fma_avx2", "fma_avx512", "bf16_dot"]),
                                          ("avx2", ["fma_avx512", "bf16_dot"])])
def test_isa_cap_stops_the_micro_kernels(level, absent):
    """PRMKERN_ISA caps the micro-kernels like every other kernel: a capped level answers -1, never runs."""
    code = ("from prmkern import _C\n"
            f"print([k for k in {absent!r} if max(_C.peak_gflops(k, 1, 1000, 1)) != -1])\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PRMKERN_ISA=level), cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_nothing_beats_the_compute_peak():
    """torch's fp32 matmul and prmkern's decode GEMM on cache-resident weights, at this process's threads, reach
    at most the fp32 FMA peak measured around them (before and after: the higher is the physical peak)."""
    before = peak_gflops(THREADS, repeats=5, seconds=0.01)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    mm = _best_rate(lambda: torch.mm(a, b), 2 * 384 ** 3) / 1e9
    x, w = torch.randn(16, 1024), torch.randn(256, 1024)
    gemm = _best_rate(lambda: OPS.decode_linear(x, w), 2 * 16 * 1024 * 256, repeats=20) / 1e9
    after = peak_gflops(THREADS, repeats=5, seconds=0.01)
    peak = max(compute_peak(before, torch.float32)[0], compute_peak(after, torch.float32)[0])
    assert mm <= peak and gemm <= peak, f"torch.mm {mm:.1f}, decode_linear {gemm:.1f} > peak {peak:.1f} GFLOP/s"
    assert compute_peak(before, torch.bfloat16)[0] >= compute_peak(before, torch.float32)[0]
    # bf16: torch's matmul (oneDNN: vdpbf16ps on AVX-512 BF16, AMX tiles where the CPU has them) stays under the
    # bf16 peak, which counts AMX through amx_bf16_torch
    a16, b16 = a.bfloat16(), b.bfloat16()
    mm16 = _best_rate(lambda: torch.mm(a16, b16), 2 * 384 ** 3) / 1e9
    peak16 = max(compute_peak(before, torch.bfloat16)[0], compute_peak(after, torch.bfloat16)[0])
    assert mm16 <= peak16, f"torch.mm bf16 {mm16:.1f} > bf16 peak {peak16:.1f} GFLOP/s ({before})"


def test_amx_counts_in_the_bf16_peak_only(monkeypatch):
    """On a CPU with AMX-BF16 the bf16 peak includes torch's AMX matmul rate; fp32's never does; elsewhere it is
    not measured. (The AMX path is exercised here by claiming the flag: the rate is then torch's bf16 matmul.)"""
    import benchmarks.roofline as roofline
    flags = isa_flags()
    assert ("amx_bf16_torch" in peak_gflops(1, repeats=1, seconds=0.002)) == flags["amx_bf16"]
    monkeypatch.setattr(roofline, "isa_flags", lambda: dict(flags, amx_bf16=True))
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda n, repeats, dtype: 1e6 if dtype == torch.bfloat16 else 0)
    peaks = roofline.peak_gflops(1, repeats=1, seconds=0.002)
    assert peaks["amx_bf16_torch"] == 1e6
    assert compute_peak(peaks, torch.bfloat16) == (1e6, "amx_bf16_torch")
    assert compute_peak(peaks, torch.float32)[1] in ("fma_avx2", "fma_avx512")
    assert compute_peak(peaks, torch.float16)[0] < 1e6


def test_native_fp16_counts_in_the_fp16_peak_only(monkeypatch):
    """On a CPU with AVX512-FP16 or AMX-FP16 the fp16 peak includes torch's fp16 matmul rate; bf16's and fp32's
    never do; elsewhere it is not measured."""
    import benchmarks.roofline as roofline
    flags = isa_flags()
    native = flags["avx512_fp16"] or flags["amx_fp16"]
    assert ("fp16_torch" in peak_gflops(1, repeats=1, seconds=0.002)) == native
    monkeypatch.setattr(roofline, "isa_flags", lambda: dict(flags, avx512_fp16=True, amx_bf16=False))
    monkeypatch.setattr(roofline, "sgemm_gflops", lambda n, repeats, dtype: 1e6 if dtype == torch.float16 else 0)
    peaks = roofline.peak_gflops(1, repeats=1, seconds=0.002)
    assert peaks["fp16_torch"] == 1e6 and "amx_bf16_torch" not in peaks
    assert compute_peak(peaks, torch.float16) == (1e6, "fp16_torch")
    assert compute_peak(peaks, torch.bfloat16)[0] < 1e6 and compute_peak(peaks, torch.float32)[0] < 1e6


def test_nothing_beats_the_read_bandwidth():
    """An independent read-only sweep (torch's max over the buffer) never beats the best of the methods."""
    size = 64 << 20
    x = torch.ones(size // 4)
    before = read_bandwidth(size)
    other = _best_rate(lambda: x.max(), size, repeats=7) / 1e9
    after = read_bandwidth(size)
    assert {"torch_sum", "cpp_sweep"} <= set(before["methods"])
    assert before["best"] == max(before["methods"].values()) > 0
    best = max(before["best"], after["best"])
    assert other <= best, f"torch max read {other:.1f} GB/s > the best method's {best:.1f} GB/s"


def test_prefill_counts_by_hand():
    """A toy prefill: hidden 8, 2 layers, 2 / 1 heads of 4, intermediate 16, vocabulary 10, 32 tokens, fp32."""
    spec = SimpleNamespace(hidden_size=8, intermediate_size=16, vocab_size=10, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=4)
    per_layer = 8 * (8 + 2 * 4) + 8 * 8 + 8 * 32 + 16 * 8
    c = prefill_counts(spec, torch.float32, 32)
    assert c["flops"] == 2 * 32 * 2 * per_layer + 2 * 10 * 8 + 4 * 2 * 2 * 4 * 32 * 33 / 2
    # weights (layers + LM head) read once, K and V of 32 tokens x 2 layers x 4 values written
    assert c["bytes"] == 4 * (2 * per_layer + 80) + 2 * 2 * 4 * 4 * 32
