// Weight-streaming GEMM for decode's few rows (one per running chain).
//
// A decode step multiplies M (1..~64) activation rows by every weight matrix, so the cost is reading the weights:
// each weight byte should come from memory exactly once per step and feed M FMAs. The weight stays in the
// checkpoint's output-major layout w[N, K] (each output column's K weights are contiguous, for every dtype): a
// tile of 4 weight rows is streamed along K against MB activation rows at a time (AVX2: 3 rows, 12 accumulators of
// 8 lanes in 16 registers; AVX-512: 6 rows, 24 accumulators of 16 lanes in 32 registers); the next MB activation
// rows re-read the tile from L1/L2, not from memory, while a later tile is prefetched (csrc/gemm_tiles.h). bf16
// and fp16 weights are widened to float32 in registers (a shift / F16C), so they read half the bytes of fp32 at
// the same arithmetic. Accumulation is float32. Threads split the N output columns into contiguous ranges (each
// thread streams its own slice of the weight). bf16 activations x bf16 weights on an AVX-512 BF16 CPU take
// decode_gemm_bf16_dot (csrc/gemm_bf16_dot.h): two multiply-adds per float32 lane per instruction.
#include "decode_gemm.h"

#include <algorithm>
#include <vector>

#if PRMKERN_X86
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace prmkern {

namespace {

// ---- portable path -------------------------------------------------------------------------------------------
template <DType T>
void gemm_range_scalar(const float* x, int64_t M, int64_t K, const void* w, int64_t ldw, const float* bias,
                       float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t esize = T == DType::F32 ? 4 : 2;
  for (int64_t n = n0; n < n1; ++n) {
    const char* wrow = static_cast<const char*>(w) + n * ldw * esize;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += ld<T>(wrow, k) * xr[k];
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

}  // namespace
}  // namespace prmkern

#include "gemm_tiles.h"     // the AVX2 / AVX-512 tile loops (use ld)
#include "gemm_bf16_dot.h"  // the AVX-512 BF16 tiles for bf16 x bf16

namespace prmkern {
namespace {

// Splits the N output columns into contiguous ranges, one per thread, aligned to the tile width, and calls
// range(n0, n1) for each. Work per thread must cover the fork/join (~a few us): below ~64K weights per thread,
// fewer threads.
template <class Range>
void split_columns(int64_t N, int64_t K, const Range& range) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N * K / 65536)));
#endif
  const int64_t chunk = ((N + threads - 1) / threads + NB - 1) / NB * NB;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t n0 = std::min<int64_t>(N, t * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
    if (n0 < n1) range(n0, n1);
  }
}

template <DType T>
void gemm_dispatch(const float* x, int64_t M, int64_t K, const void* w, int64_t N, int64_t ldw, const float* bias,
                   float* y, int64_t ldy) {
  const Isa isa = cpu_isa_level();
  split_columns(N, K, [&](int64_t n0, int64_t n1) {
#if PRMKERN_X86
    if (isa == Isa::Avx512) return avx512_tiles::gemm_range<T>(x, M, K, w, ldw, bias, y, ldy, n0, n1);
    if (isa == Isa::Avx2) return avx2_tiles::gemm_range<T>(x, M, K, w, ldw, bias, y, ldy, n0, n1);
#endif
    (void)isa;
    gemm_range_scalar<T>(x, M, K, w, ldw, bias, y, ldy, n0, n1);
  });
}

}  // namespace

void decode_gemm(const float* x, int64_t M, int64_t K, const void* w, DType wtype, int64_t N, int64_t ldw,
                 const float* bias, float* y, int64_t ldy) {
  switch (wtype) {
    case DType::F32: gemm_dispatch<DType::F32>(x, M, K, w, N, ldw, bias, y, ldy); break;
    case DType::BF16: gemm_dispatch<DType::BF16>(x, M, K, w, N, ldw, bias, y, ldy); break;
    case DType::F16: gemm_dispatch<DType::F16>(x, M, K, w, N, ldw, bias, y, ldy); break;
  }
}

}  // namespace prmkern

namespace prmkern {

void decode_gemm_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t ldw,
                          const float* bias, float* y, int64_t ldy) {
#if PRMKERN_X86
  if (cpu_has_bf16_dot()) {
    split_columns(N, K, [&](int64_t n0, int64_t n1) { gemm_range_bf16_dot(x, M, K, w, ldw, bias, y, ldy, n0, n1); });
    return;
  }
#endif
  // No AVX-512 BF16 (or PRMKERN_BF16_DOT=0): widen x and take the widening GEMM.
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(x[i]);
  decode_gemm(xf.data(), M, K, w, DType::BF16, N, ldw, bias, y, ldy);
}

}  // namespace prmkern
