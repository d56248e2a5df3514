"""Prefill GEMMs (many rows) on AVX2 CPUs: prmkern's blocked C++ GEMM, or without it a widened sgemm for bf16.

With the C++ kernels at the AVX2 level (no AVX-512: those CPUs get panel copies, models/decode_panels.py), a
product of more than CPP_MAX_ROWS rows runs csrc/prefill_gemm.cpp: weight blocks widened to fp32 and packed in
cache, a 6 x 16 register tile. Measured 2026-12-07 on the AVX2 AMD EPYC here, 2 threads, per 2 CPU-seconds (the
machine was shared; CPU time keeps the ratios): 1024 rows x the 1.5B model's bf16 gate/up (17920 x 1536) 122
GFLOP/s against 107 widened + MKL; down (1536 x 8960) 119 against 113; 512 rows x the 39M model's fp32 gate/up
(2816 x 512) 137 against MKL's 99, its down (512 x 1408) 91 against 60.

Without the C++ kernels, on a CPU without AVX-512 BF16 or AMX (the AVX2-only AMD EPYC here), torch's bf16
matmul has no fast kernel: a prefill product of 1024 rows by a 8960 x 1536 bf16 weight ran at 6.1 GFLOP/s (2 threads), against 105 GFLOP/s
per 2 CPU-seconds for the same product widened to fp32 first (the weight converted whole, ~110 MB for the
largest projection of a 1.5B model, then MKL's sgemm), measured 2026-12-07 on a loaded machine (CPU time, so the
ratio holds). Converting the weight in slabs of 128-2048 rows was slower (MKL runs narrow products worse), so the
weight is widened whole, per call, and dropped after it. The products of bf16 values are exact in fp32 and the sum
is fp32, as in torch's bf16 matmul; the result is rounded once to the activations' dtype.

Does not: touch decode (a few rows run in C++ on the weights as they are), nor CPUs with AVX-512 (panels, or
oneDNN's bf16 kernels where the CPU has native bf16).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_ROWS = 129  # above the C++ decode GEMM's rows (prmkern.ops.cpp.CPP_MAX_ROWS)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo; False off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def wants_widening(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU product of many rows by a bf16 / fp16 weight, on a CPU without native bf16."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= MIN_ROWS
            and weight.dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16())


def use_cpp_prefill(cpp, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The C++ prefill GEMM takes this product: many rows, a contiguous weight, kernels at the AVX2 level (and a
    build that has it: an extension built before csrc/prefill_gemm.cpp existed falls back to the torch GEMM)."""
    return (cpp is not None and hasattr(cpp, "prefill_linear") and x.dim() == 2 and x.shape[0] >= MIN_ROWS
            and weight.is_contiguous() and cpp.cpu_isa() == "avx2")


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N] in fp32, returned in x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # [M, N] fp32
    return out.to(x.dtype)
