// The vector types of the CPU GEMMs, written once per instruction set: `Avx2` (8 float lanes, 16 registers) and
// `Avx512` (16 lanes, 32 registers), each function carrying its ISA's target attribute (entered only after the
// run-time check of cpu_features), and `Prefetcher`, which spreads a later weight tile's cache-line requests over
// the current tile's work. Used by the dot-product tiles (gemm_tiles.h) and the panel tiles (panel_gemm.cpp).
#pragma once
#include <algorithm>

#include "cpu_features.h"

#if PRMKERN_X86
#include <immintrin.h>

namespace prmkern {
namespace {

// Requests the cache lines of a later weight tile (`rows` rows of `row_bytes` from `base`), `per_step` lines per
// step(), spread over the `slots` steps the current tile takes, in the order the tile's first pass consumes them:
// line k of every row, then line k + 1 (row by row, the last rows' first lines arrived late; measured 1.0-1.15x on
// weights streamed from memory). Lines past the weight's end are harmless (a prefetch never faults).
struct Prefetcher {
  const char* base;
  int64_t rows, lines, row_bytes, per_step, row = 0, line = 0;
  Prefetcher(const char* b, int64_t r, int64_t rb, int64_t slots)
      : base(b), rows(r), lines(r > 0 ? (rb + 63) / 64 : 0), row_bytes(rb),
        per_step(std::max<int64_t>(1, (r * ((rb + 63) / 64) + slots - 1) / std::max<int64_t>(slots, 1))) {}
  inline void step() {
    for (int64_t i = 0; i < per_step && line < lines; ++i) {
      // To L2 (T1): an L1 prefetch of the next tile evicts the activation rows the current passes re-read.
      _mm_prefetch(base + row * row_bytes + line * 64, _MM_HINT_T1);
      if (++row == rows) { row = 0; ++line; }
    }
  }
};

#define PK_AVX2_FN PRMKERN_AVX2 inline __attribute__((always_inline))
#define PK_AVX512_FN PRMKERN_AVX512 inline __attribute__((always_inline))

struct Avx2 {
  using reg = __m256;
  static constexpr int W = 8, MB = 3;  // 4 x 3 accumulators + 3 activations + 1 weight = 16 registers
  static constexpr int PNV = 3, PMR = 4;  // panel tiles: 3 x 4 accumulators + 3 weights + 1 broadcast = 16
  static PK_AVX2_FN reg zero() { return _mm256_setzero_ps(); }
  static PK_AVX2_FN reg load(const float* p) { return _mm256_loadu_ps(p); }
  static PK_AVX2_FN reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static PK_AVX2_FN reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  // set1, not _mm256_broadcast_ss: with that intrinsic GCC kept the panel tile's 12 accumulators in memory too,
  // storing all of them every k (half speed, measured)
  static PK_AVX2_FN reg bcast(const float* p) { return _mm256_set1_ps(*p); }
  static PK_AVX2_FN void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  template <DType T>
  static PK_AVX2_FN reg loadw(const void* base, int64_t i) {
    if constexpr (T == DType::F32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (T == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      else return _mm256_cvtph_ps(h);
    }
  }
  // [sum a, sum b, sum c, sum d]
  static PK_AVX2_FN __m128 reduce4(reg a, reg b, reg c, reg d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  static PK_AVX2_FN float reduce1(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

struct Avx512 {
  using reg = __m512;
  static constexpr int W = 16, MB = 6;  // 4 x 6 accumulators + 6 activations + 1 weight = 31 of 32 registers
  static constexpr int PNV = 3, PMR = 8;  // panel tiles: 3 x 8 accumulators + 3 weights + 1 broadcast = 28
  static PK_AVX512_FN reg zero() { return _mm512_setzero_ps(); }
  static PK_AVX512_FN reg load(const float* p) { return _mm512_loadu_ps(p); }
  static PK_AVX512_FN reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static PK_AVX512_FN reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static PK_AVX512_FN reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static PK_AVX512_FN void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  template <DType T>
  static PK_AVX512_FN reg loadw(const void* base, int64_t i) {
    if constexpr (T == DType::F32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (T == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else return _mm512_cvtph_ps(h);
    }
  }
  // [sum a, sum b, sum c, sum d] by 128-bit lane shuffles: lane L of `q` ends up holding row L's 4 partial sums.
  static PK_AVX512_FN __m128 reduce4(reg a, reg b, reg c, reg d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));  // pairs within each lane
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));  // every element of lane L = row L's sum
    const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, q));
  }
  static PK_AVX512_FN float reduce1(reg a) { return _mm512_reduce_add_ps(a); }
};

}  // namespace
}  // namespace prmkern
#endif
