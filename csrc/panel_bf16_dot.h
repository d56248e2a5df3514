// The panel GEMM for bf16 activations x bf16 weights on CPUs with AVX-512 BF16 (included by csrc/panel_gemm.cpp
// after its AVX-512 panel tiles, whose store_tile it shares). The weights are packed in pair panels
// [ceil(N/48), ceil(K/2), 48, 2]: for each pair of k, 48 outputs' two weights side by side (zero past N and past K),
// so one 64-byte load holds 16 outputs x 2 k, the layout `vdpbf16ps` multiplies against a broadcast pair of
// activations: two products per float32 lane per instruction, twice an fp32 FMA's. Tiles: 3 vectors (48 outputs) x
// 8 activation rows = 24 accumulators + 3 weights + 1 broadcast of 32 registers. Each output is one chain of pair
// products over k in order (float32, round-to-nearest-even, denormals flushed as the instruction does), the same at
// any row or thread count.
// Shapes: x [M, K] bf16 bits (K odd: the last pair's second activation is taken as zero), y [M, ldy] float32.
#pragma once

#if PRMKERN_X86
#include <immintrin.h>

namespace prmkern {
namespace {

#define PK_PBF16_FN PRMKERN_AVX512_BF16 inline __attribute__((always_inline))

// The activation pair (x[2 kk], x[2 kk + 1]) of one row as a 32-bit pattern, the second zero past K.
PK_PBF16_FN uint32_t act_pair(const uint16_t* xr, int64_t kk, int64_t K) {
  const int64_t k = 2 * kk;
  if (k + 1 < K) {
    uint32_t v;
    std::memcpy(&v, xr + k, 4);
    return v;
  }
  return xr[k];
}

template <int NV, int MR>
PK_PBF16_FN void pair_tile(const uint16_t* x, int64_t K, const uint16_t* panel, int64_t c0, const float* bias,
                           float* y, int64_t ldy, int64_t n, int64_t valid, int64_t m, Prefetcher& pf) {
  constexpr int64_t KSTRIDE = kPanelCols * 2;  // bf16 elements per pair of k
  const int64_t K2 = (K + 1) / 2, full = K / 2;  // pairs; pairs with both activations inside K
  __m512 acc[NV][MR];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm512_setzero_ps();
  const uint16_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + (m + i) * K;
  const uint16_t* wp = panel + c0 * 2;
  for (int64_t kk = 0; kk < K2; ++kk, wp += KSTRIDE) {
    pf.step();
    __m512bh wv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wp + j * 32);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      if (kk < full) std::memcpy(&pair, xr[i] + 2 * kk, 4);
      else pair = act_pair(xr[i], kk, K);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[j], b);
    }
  }
  avx512_panels::store_tile<NV, MR>(acc, y, ldy, bias, n + c0, valid, m);
}

template <int NV>
PK_PBF16_FN void pair_passes(const uint16_t* x, int64_t M, int64_t K, const uint16_t* panel, int64_t c0,
                             const float* bias, float* y, int64_t ldy, int64_t n, int64_t valid, Prefetcher& pf) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) pair_tile<NV, 8>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf);
  switch (M - m) {
    case 7: pair_tile<NV, 7>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 6: pair_tile<NV, 6>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 5: pair_tile<NV, 5>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 4: pair_tile<NV, 4>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 3: pair_tile<NV, 3>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 2: pair_tile<NV, 2>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    case 1: pair_tile<NV, 1>(x, K, panel, c0, bias, y, ldy, n, valid, m, pf); break;
    default: break;
  }
}

// Output columns n0 .. n1 (one thread's range, n0 a multiple of 16) over the pair panels.
PRMKERN_AVX512_BF16 void pair_panel_range(const uint16_t* x, int64_t M, int64_t K, const uint16_t* panels,
                                          const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t panel_elems = (K + 1) / 2 * kPanelCols * 2;
  for (int64_t p = n0 / kPanelCols; p * kPanelCols < n1; ++p) {
    const int64_t n = p * kPanelCols, c_lo = std::max<int64_t>(n0 - n, 0), c_hi = std::min(kPanelCols, n1 - n);
    const uint16_t* panel = panels + p * panel_elems;
    const bool more = (p + 1) * kPanelCols < n1;
    Prefetcher pf(reinterpret_cast<const char*>(panel + panel_elems), more ? 1 : 0, panel_elems * 2,
                  (M + 7) / 8 * ((K + 1) / 2));
    const int64_t valid = c_hi - c_lo, nv = (valid + 15) / 16;
    if (nv >= 3) pair_passes<3>(x, M, K, panel, c_lo, bias, y, ldy, n, valid, pf);
    else if (nv == 2) pair_passes<2>(x, M, K, panel, c_lo, bias, y, ldy, n, valid, pf);
    else pair_passes<1>(x, M, K, panel, c_lo, bias, y, ldy, n, valid, pf);
  }
}

#undef PK_PBF16_FN

}  // namespace
}  // namespace prmkern
#endif
