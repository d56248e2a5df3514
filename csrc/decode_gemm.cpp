// Weight-streaming GEMM for decode's few rows (one per running chain).
//
// A decode step multiplies M (1..~64) activation rows by every weight matrix, so the cost is reading the weights:
// each weight byte should come from memory exactly once per step and feed M FMAs. The weight stays in the
// checkpoint's output-major layout w[N, K] (each output column's K weights are contiguous, for every dtype): a
// tile of 4 weight rows is streamed along K against 3 activation rows at a time (12 float32 accumulators of 8
// lanes + 3 activation vectors + 1 weight vector = the 16 AVX2 registers); the next 3 activation rows re-read the
// tile from L1/L2, not from memory. bf16 and fp16 weights are widened to float32 in registers (a shift / F16C), so
// they read half the bytes of fp32 at the same arithmetic. Accumulation is float32. Threads split the N output
// columns into contiguous ranges (each thread streams its own slice of the weight).
#include "decode_gemm.h"

#include <algorithm>

#if PRMKERN_X86
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace prmkern {

namespace {

constexpr int NB = 4;  // weight rows (output columns) per tile
constexpr int MB = 3;  // activation rows per tile

template <DType T>
inline float load_scalar(const void* base, int64_t i) {
  if constexpr (T == DType::F32) return static_cast<const float*>(base)[i];
  else if constexpr (T == DType::BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  else return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

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
      for (int64_t k = 0; k < K; ++k) acc += load_scalar<T>(wrow, k) * xr[k];
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

#if PRMKERN_X86
// ---- AVX2 + FMA path ------------------------------------------------------------------------------------------
template <DType T>
PRMKERN_AVX2 inline __m256 load8(const void* base, int64_t i) {
  if constexpr (T == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (T == DType::BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_cvtph_ps(h);
  }
}

PRMKERN_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One tile: rows n..n+NR of w against rows m..m+MR of x.
template <DType T, int NR, int MR>
PRMKERN_AVX2 inline void tile(const float* x, int64_t K, const char* w, int64_t wrow_bytes, const float* bias,
                              float* y, int64_t ldy, int64_t n, int64_t m, const char* prefetch) {
  constexpr int64_t ES = T == DType::F32 ? 4 : 2;
  __m256 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm256_setzero_ps();
  const void* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (n + j) * wrow_bytes;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + (m + i) * K;
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    // The first row tile streams the weights from memory: prefetch the next weight tile's same columns (one
    // cache line of each of its NB rows per 64 bytes of K), so memory requests stay ahead of the FMAs.
    if (prefetch != nullptr && (k * ES) % 64 == 0)
      for (int j = 0; j < NB; ++j) _mm_prefetch(prefetch + j * wrow_bytes + k * ES, _MM_HINT_T0);
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xr[i] + k);
    for (int j = 0; j < NR; ++j) {
      __m256 wv = load8<T>(wr[j], k);
      for (int i = 0; i < MR; ++i) acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    for (int i = 0; i < MR; ++i) {
      float s = hsum(acc[j][i]);
      for (int64_t k = K8; k < K; ++k) s += load_scalar<T>(wr[j], k) * xr[i][k];
      y[(m + i) * ldy + n + j] = s + (bias ? bias[n + j] : 0.f);
    }
  }
}

template <DType T, int NR>
PRMKERN_AVX2 inline void tile_rows(const float* x, int64_t M, int64_t K, const char* w, int64_t wrow_bytes,
                                   const float* bias, float* y, int64_t ldy, int64_t n) {
  const char* pf = w + (n + NB) * wrow_bytes;  // the next tile (past the weight's end is harmless: no fault)
  int64_t m = 0;
  for (; m + MB <= M; m += MB, pf = nullptr) tile<T, NR, MB>(x, K, w, wrow_bytes, bias, y, ldy, n, m, pf);
  if (M - m == 2) tile<T, NR, 2>(x, K, w, wrow_bytes, bias, y, ldy, n, m, pf);
  else if (M - m == 1) tile<T, NR, 1>(x, K, w, wrow_bytes, bias, y, ldy, n, m, pf);
}

template <DType T>
PRMKERN_AVX2 void gemm_range_avx2(const float* x, int64_t M, int64_t K, const void* w, int64_t ldw,
                                  const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t wrow_bytes = ldw * (T == DType::F32 ? 4 : 2);
  const char* wb = static_cast<const char*>(w);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile_rows<T, NB>(x, M, K, wb, wrow_bytes, bias, y, ldy, n);
  for (; n < n1; ++n) tile_rows<T, 1>(x, M, K, wb, wrow_bytes, bias, y, ldy, n);
}
#endif

template <DType T>
void gemm_dispatch(const float* x, int64_t M, int64_t K, const void* w, int64_t N, int64_t ldw, const float* bias,
                   float* y, int64_t ldy) {
  // Work per thread must cover the fork/join (~a few us): below ~64K weights per thread, fewer threads.
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N * K / 65536)));
#endif
  const bool avx2 = cpu_has_avx2();
  // Contiguous column ranges per thread, aligned to the tile width.
  const int64_t chunk = ((N + threads - 1) / threads + NB - 1) / NB * NB;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t n0 = std::min<int64_t>(N, t * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
    if (n0 >= n1) continue;
#if PRMKERN_X86
    if (avx2) {
      gemm_range_avx2<T>(x, M, K, w, ldw, bias, y, ldy, n0, n1);
      continue;
    }
#endif
    (void)avx2;
    gemm_range_scalar<T>(x, M, K, w, ldw, bias, y, ldy, n0, n1);
  }
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
