// Micro-kernels that measure this machine's physical ceilings for benchmarks/roofline.py: the fp32 FMA rate of
// one core at each instruction-set level (AVX2 FMA3: 8 lanes, AVX-512F: 16 lanes), the bf16 dot-product rate
// (vdpbf16ps: 32 bf16 pairs into 16 float32 lanes) where the CPU has AVX-512 BF16, and the read bandwidth of a
// buffer swept by every thread. They compute nothing useful: each FMA loop keeps 12 independent accumulators in
// registers (enough to cover the FMA latency x the FMA ports of current x86 cores: 4-5 cycles x 2 ports), so its
// time is set by the FMA throughput alone. A level the CPU lacks is never entered (run-time checks, as elsewhere);
// asking for one returns -1. Not a GEMM, not used by the engine.
#include "peak.h"

#include <omp.h>

#include <time.h>

#include <chrono>
#include <cstring>

#if PRMKERN_X86
#include <immintrin.h>
#endif

namespace prmkern {
namespace {

constexpr int kAcc = 12;  // independent accumulator chains per thread

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double thread_cpu_s() {  // CPU time of the calling thread: what a busy neighbour cannot stretch
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Each function runs `iters` x kAcc vector FMAs and returns a value that depends on all of them (so that the
// compiler keeps them). The FLOPs are 2 x lanes x kAcc x iters.
#if PRMKERN_X86
PRMKERN_AVX2 float fma_loop_avx2(int64_t iters, float seed) {
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(seed + 0.001f * i);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}

PRMKERN_AVX512 float fma_loop_avx512(int64_t iters, float seed) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(seed + 0.001f * i);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  return _mm512_reduce_add_ps(acc[0]) + _mm512_reduce_add_ps(acc[kAcc - 1]);
}

// One vdpbf16ps: 16 lanes x 2 products x 2 FLOPs = 64 FLOPs.
PRMKERN_AVX512_BF16 float bf16_dot_loop(int64_t iters, float seed) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(seed + 0.001f * i);
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-4f), _mm512_set1_ps(1e-4f));
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  return _mm512_reduce_add_ps(acc[0]) + _mm512_reduce_add_ps(acc[kAcc - 1]);
}

// The sum of a float buffer with 8 independent 256-bit accumulators: the loads, not the adds, set the pace.
PRMKERN_AVX2 float sum_avx2(const float* p, int64_t n) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_loadu_ps(p + k + 8 * i));
  }
  for (int i = 1; i < 8; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  float out[8], s = 0.f;
  _mm256_storeu_ps(out, acc[0]);
  for (int i = 0; i < 8; ++i) s += out[i];
  for (; k < n; ++k) s += p[k];
  return s;
}
#endif

float sum_scalar(const float* p, int64_t n) {
  float s[8] = {0.f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int i = 0; i < 8; ++i) s[i] += p[k + i];
  for (; k < n; ++k) s[0] += p[k];
  float t = 0.f;
  for (float v : s) t += v;
  return t;
}

// FLOPs of one instruction (lanes x 2 for an FMA, lanes x 4 for vdpbf16ps), or 0 when this CPU cannot run `kind`.
int flops_per_instruction(PeakKind kind) {
  switch (kind) {
    case PeakKind::FmaAvx2: return cpu_has_avx2() ? 8 * 2 : 0;
    case PeakKind::FmaAvx512: return cpu_has_avx512() ? 16 * 2 : 0;
    case PeakKind::Bf16Dot: return cpu_has_bf16_dot() ? 16 * 4 : 0;
  }
  return 0;
}

float run_loop(PeakKind kind, int64_t iters, float seed) {
#if PRMKERN_X86
  switch (kind) {
    case PeakKind::FmaAvx2: return fma_loop_avx2(iters, seed);
    case PeakKind::FmaAvx512: return fma_loop_avx512(iters, seed);
    case PeakKind::Bf16Dot: return bf16_dot_loop(iters, seed);
  }
#endif
  (void)kind, (void)iters;
  return seed;
}

}  // namespace

Rates peak_gflops(PeakKind kind, int threads, int64_t iters, int repeats, float* sink) {
  const int per = flops_per_instruction(kind);
  if (per == 0 || threads < 1 || iters < 1 || repeats < 1) return {-1.0, -1.0};
  const double flops = static_cast<double>(per) * kAcc * static_cast<double>(iters);  // per thread
  Rates best{0.0, 0.0};
  float total = 0.f;
  for (int r = 0; r < repeats; ++r) {
    float acc = 0.f;
    double cpu_rate = 0.0;
    const double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : acc, cpu_rate)
    {
      const double c0 = thread_cpu_s();
      acc += run_loop(kind, iters, 1.0f + 0.01f * omp_get_thread_num());
      cpu_rate += flops / (thread_cpu_s() - c0);
    }
    const double wall = flops * threads / (now_s() - t0);
    total += acc;
    best.wall = wall > best.wall ? wall : best.wall;
    best.cpu = cpu_rate > best.cpu ? cpu_rate : best.cpu;
  }
  if (sink != nullptr) *sink = total;
  return {best.wall / 1e9, best.cpu / 1e9};
}

Rates read_gbs(const float* p, int64_t n, int threads, int repeats, float* sink) {
  if (n < 1 || threads < 1 || repeats < 1) return {-1.0, -1.0};
  Rates best{0.0, 0.0};
  float total = 0.f;
  const bool vec = cpu_has_avx2();
  for (int r = 0; r < repeats; ++r) {
    float acc = 0.f;
    double cpu_max = 0.0;
    const double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : acc) reduction(max : cpu_max)
    {
      const double c0 = thread_cpu_s();
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t chunk = (n + nt - 1) / nt, lo = t * chunk, hi = lo + chunk < n ? lo + chunk : n;
      if (lo < hi) {
#if PRMKERN_X86
        acc += vec ? sum_avx2(p + lo, hi - lo) : sum_scalar(p + lo, hi - lo);
#else
        (void)vec;
        acc += sum_scalar(p + lo, hi - lo);
#endif
      }
      const double c = thread_cpu_s() - c0;
      cpu_max = c > cpu_max ? c : cpu_max;
    }
    const double wall = 4.0 * static_cast<double>(n) / (now_s() - t0), cpu = 4.0 * static_cast<double>(n) / cpu_max;
    total += acc;
    best.wall = wall > best.wall ? wall : best.wall;
    best.cpu = cpu > best.cpu ? cpu : best.cpu;
  }
  if (sink != nullptr) *sink = total;
  return {best.wall / 1e9, best.cpu / 1e9};
}

}  // namespace prmkern
