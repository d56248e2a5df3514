// Micro-kernels measuring this machine's ceilings (csrc/peak.cpp): FMA and bf16 dot-product throughput at each
// instruction-set level, and read bandwidth. For benchmarks/roofline.py; the engine never calls them.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

enum class PeakKind : int { FmaAvx2 = 0, FmaAvx512 = 1, Bf16Dot = 2 };

// A rate timed two ways: by the wall clock, and by the threads' own CPU time (which a neighbour process taking the
// core away cannot stretch; the rate the hardware gives while the thread runs).
struct Rates {
  double wall;
  double cpu;
};

// The best of `repeats` runs of `threads` threads each issuing `iters` x 12 independent instructions of `kind`, in
// GFLOP/s (an FMA lane = 2 FLOPs; a vdpbf16ps lane = 2 products + 2 adds = 4 FLOPs): work / wall time, and the sum
// over threads of each one's work / its CPU time. {-1, -1} when this CPU (capped by PRMKERN_ISA) cannot run `kind`.
// `sink` receives a value depending on every result.
Rates peak_gflops(PeakKind kind, int threads, int64_t iters, int repeats, float* sink);

// The best of `repeats` sweeps of p[0, n) split over `threads` threads, in GB/s of float32 read: bytes / wall time,
// and bytes / the longest CPU time of a thread.
Rates read_gbs(const float* p, int64_t n, int threads, int repeats, float* sink);

}  // namespace prmkern
