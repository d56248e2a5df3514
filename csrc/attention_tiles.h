// AVX2 register tiles of the paged decode attention (csrc/paged_attention.cpp, its only includer): scores of a
// chunk of CHUNK keys against the queries, and the P @ V accumulation. Functions carry PRMKERN_AVX2 and are only
// entered after the run-time check.
#pragma once
#include "cpu_features.h"

#if PRMKERN_X86
#include <immintrin.h>

namespace prmkern {
namespace {

// S[i, t] = Q[i, :] . K[t, :] for i < nq, t < CHUNK, from the transposed chunk Kt [D, CHUNK] (vectorised over
// keys: two queries x 32 keys = 8 accumulators per pass over D).
PRMKERN_AVX2 void qk_avx2(const float* Q, int64_t nq, int64_t D, const float* Kt, float* S) {
  int64_t i = 0;
  for (; i + 2 <= nq; i += 2) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float* q0 = Q + i * D;
    const float* q1 = q0 + D;
    for (int64_t d = 0; d < D; ++d) {
      const float* k = Kt + d * CHUNK;
      const __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8), k2 = _mm256_loadu_ps(k + 16),
                   k3 = _mm256_loadu_ps(k + 24);
      const __m256 x = _mm256_broadcast_ss(q0 + d), y = _mm256_broadcast_ss(q1 + d);
      a0 = _mm256_fmadd_ps(x, k0, a0); a1 = _mm256_fmadd_ps(x, k1, a1);
      a2 = _mm256_fmadd_ps(x, k2, a2); a3 = _mm256_fmadd_ps(x, k3, a3);
      b0 = _mm256_fmadd_ps(y, k0, b0); b1 = _mm256_fmadd_ps(y, k1, b1);
      b2 = _mm256_fmadd_ps(y, k2, b2); b3 = _mm256_fmadd_ps(y, k3, b3);
    }
    float* s0 = S + i * CHUNK;
    float* s1 = s0 + CHUNK;
    _mm256_storeu_ps(s0, a0); _mm256_storeu_ps(s0 + 8, a1); _mm256_storeu_ps(s0 + 16, a2); _mm256_storeu_ps(s0 + 24, a3);
    _mm256_storeu_ps(s1, b0); _mm256_storeu_ps(s1 + 8, b1); _mm256_storeu_ps(s1 + 16, b2); _mm256_storeu_ps(s1 + 24, b3);
  }
  for (; i < nq; ++i) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float* q0 = Q + i * D;
    for (int64_t d = 0; d < D; ++d) {
      const float* k = Kt + d * CHUNK;
      const __m256 x = _mm256_broadcast_ss(q0 + d);
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k), a0); a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 8), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 16), a2); a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 24), a3);
    }
    float* s0 = S + i * CHUNK;
    _mm256_storeu_ps(s0, a0); _mm256_storeu_ps(s0 + 8, a1); _mm256_storeu_ps(s0 + 16, a2); _mm256_storeu_ps(s0 + 24, a3);
  }
}

// acc[i, d0:d0+8*NV] = acc * alpha[i] + sum_t P[i, t] V[t, d0:...] for two queries at once.
template <int NV, int NQ>
PRMKERN_AVX2 inline void pv_tile(const float* P, int64_t C, const float* V, int64_t D, float* acc,
                                 const float* alpha, int64_t i, int64_t d0) {
  __m256 a[NQ][NV];
  for (int r = 0; r < NQ; ++r) {
    const __m256 al = _mm256_broadcast_ss(alpha + i + r);
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + (i + r) * D + d0 + 8 * v), al);
  }
  for (int64_t t = 0; t < C; ++t) {
    __m256 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm256_loadu_ps(V + t * D + d0 + 8 * v);
    for (int r = 0; r < NQ; ++r) {
      const __m256 p = _mm256_broadcast_ss(P + (i + r) * CHUNK + t);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(p, vv[v], a[r][v]);
    }
  }
  for (int r = 0; r < NQ; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + (i + r) * D + d0 + 8 * v, a[r][v]);
}

// D a multiple of 8.
PRMKERN_AVX2 void pv_avx2(const float* P, int64_t nq, int64_t C, const float* V, int64_t D, float* acc,
                          const float* alpha) {
  int64_t i = 0;
  for (; i + 2 <= nq; i += 2) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) pv_tile<4, 2>(P, C, V, D, acc, alpha, i, d0);
    for (; d0 < D; d0 += 8) pv_tile<1, 2>(P, C, V, D, acc, alpha, i, d0);
  }
  for (; i < nq; ++i) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) pv_tile<4, 1>(P, C, V, D, acc, alpha, i, d0);
    for (; d0 < D; d0 += 8) pv_tile<1, 1>(P, C, V, D, acc, alpha, i, d0);
  }
}


}  // namespace
}  // namespace prmkern
#endif
