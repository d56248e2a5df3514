"""Keeping freed memory in the process when the engine runs on the CPU, so that a prefill's large temporaries do
not page-fault on every layer.

glibc's malloc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap and returns it to the
kernel on free; a heap top above M_TRIM_THRESHOLD is returned too. A prefill of 1,024 tokens on the 1.5B shape
allocates ~160 MB of activations per layer ([1024, 17920] gate/up outputs in fp32 and bf16, ...), so every layer
faulted in and zeroed the same pages again: 1.05 million minor faults and 4.2 s of system time per prefill.
`keep_freed_memory()` sets M_MMAP_MAX = 0 (blocks come from the heap; glibc still falls back to mmap where the heap
cannot grow) and M_TRIM_THRESHOLD to its largest value, so a freed block is reused by the next layer: 7.7 thousand
faults, 0.0 s system time, the prefill 30.0 s -> 26.4 s, peak RSS unchanged (4.18 -> 4.20 GB), measured 2026-12-07
on the AMD EPYC (Zen 3, AVX2) here, 2 threads, `LLM.generate` of one 1,024-token prompt, 8 chains, 2 tokens, on the
random-weight R1-Distill-Qwen-1.5B shape in bf16. It is what LD_PRELOAD of tcmalloc or jemalloc does for vLLM's CPU
build (its installation guide asks for one), without a dependency.

It is process-wide, so it is applied once, by the first CPU engine, and only with glibc. PRMKERN_CPU_MALLOC=default
leaves malloc as it is. The cost: memory freed by the engine stays in the process for its next use instead of
returning to the system (the peak is the same).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1

_applied: bool | None = None  # None: not tried yet; else whether the settings took


def keep_freed_memory() -> bool:
    """Applies the settings above once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("PRMKERN_CPU_MALLOC", "").strip().lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success; the trim threshold first, so that a failure leaves mmap as it was
    return bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX)) and bool(mallopt(M_MMAP_MAX, 0))
