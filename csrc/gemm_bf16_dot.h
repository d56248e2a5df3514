// The decode GEMM for bf16 activations x bf16 weights on CPUs with AVX-512 BF16 (AMD Zen 4+, Intel Cooper Lake /
// Sapphire Rapids+): `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 float32 lanes in one instruction,
// twice the multiply-adds of an fp32 FMA and with no widening of the weights. Included by csrc/decode_gemm.cpp
// after gemm_tiles.h (reuses its Prefetcher and Avx512::reduce4).
//
// Shapes: x [M, K] bf16 (the model's own bf16 activations: no rounding is added), w [N, K] bf16 rows of ldw
// elements, y [M, ldy] float32. Tiles of 4 weight rows x 6 activation rows (24 accumulators + 6 x + 1 w of 32
// registers). Products of bf16 values are exact in float32; the instruction accumulates in float32 with
// round-to-nearest-even and flushes denormals (bf16 values below ~1e-38), as oneDNN's bf16 GEMMs do.
#pragma once
#include "cpu_features.h"

#if PRMKERN_X86
#include <immintrin.h>

namespace prmkern {
namespace {

#define PK_BF16DOT_FN PRMKERN_AVX512_BF16 inline __attribute__((always_inline))

template <int NR, int MR>
PK_BF16DOT_FN void tile_bf16_dot(const uint16_t* x, int64_t K, const uint16_t* w, int64_t ldw, const float* bias,
                                 float* y, int64_t ldy, int64_t n, int64_t m, Prefetcher& pf) {
  __m512 acc[NR][MR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm512_setzero_ps();
  const uint16_t* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (n + j) * ldw;
  const uint16_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + (m + i) * K;
  const int64_t K32 = K - K % 32;
  for (int64_t k = 0; k < K32; k += 32) {  // 64 weight bytes per row per iteration
    pf.step();
    __m512i xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512(xr[i] + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, (__m512bh)xv[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m + i) * ldy + n;
    float s[NR];
    if constexpr (NR == 4) {
      _mm_storeu_ps(s, Avx512::reduce4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]));
    } else {
      for (int j = 0; j < NR; ++j) s[j] = _mm512_reduce_add_ps(acc[j][i]);
    }
    for (int j = 0; j < NR; ++j) {
      for (int64_t k = K32; k < K; ++k) s[j] += bf16_to_float(wr[j][k]) * bf16_to_float(xr[i][k]);  // K % 32 tail
      yr[j] = s[j] + (bias ? bias[n + j] : 0.f);
    }
  }
}

template <int NR>
PK_BF16DOT_FN void tile_rows_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t ldw,
                                      const float* bias, float* y, int64_t ldy, int64_t n, int64_t n_end) {
  constexpr int64_t MB = 6;
  const int64_t passes = (M + MB - 1) / MB;
  const int64_t ahead = std::min<int64_t>(NB, std::max<int64_t>(0, n_end - n - NR));
  Prefetcher pf(reinterpret_cast<const char*>(w + (n + NR) * ldw), ahead, ldw * 2, passes * std::max<int64_t>(1, K / 32));
  int64_t m = 0;
  for (; m + MB <= M; m += MB) tile_bf16_dot<NR, MB>(x, K, w, ldw, bias, y, ldy, n, m, pf);
  switch (M - m) {
    case 5: tile_bf16_dot<NR, 5>(x, K, w, ldw, bias, y, ldy, n, m, pf); break;
    case 4: tile_bf16_dot<NR, 4>(x, K, w, ldw, bias, y, ldy, n, m, pf); break;
    case 3: tile_bf16_dot<NR, 3>(x, K, w, ldw, bias, y, ldy, n, m, pf); break;
    case 2: tile_bf16_dot<NR, 2>(x, K, w, ldw, bias, y, ldy, n, m, pf); break;
    case 1: tile_bf16_dot<NR, 1>(x, K, w, ldw, bias, y, ldy, n, m, pf); break;
    default: break;
  }
}

// Output columns n0..n1 (one thread's range).
PRMKERN_AVX512_BF16 void gemm_range_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t ldw,
                                             const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile_rows_bf16_dot<NB>(x, M, K, w, ldw, bias, y, ldy, n, n1);
  for (; n < n1; ++n) tile_rows_bf16_dot<1>(x, M, K, w, ldw, bias, y, ldy, n, n1);
}

#undef PK_BF16DOT_FN

}  // namespace
}  // namespace prmkern
#endif
