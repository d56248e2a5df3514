// The small vector types the decode attention kernel (attention_tiles.h) is written against, one per instruction
// set: VecScalar (portable, 8 floats in a plain array that -O3 vectorizes with baseline SSE2), Vec8 (AVX2 + FMA +
// F16C) and Vec16 (AVX-512F). Each gives W lanes of float32 and the handful of operations the kernel needs: load,
// store, broadcast, fma, max, exp2, and the conversion of a bf16 / fp16 cache row to float32.
//
// Every Vec8 / Vec16 member carries its own target attribute; the kernel code that calls them is compiled inside a
// matching target region (paged_attention.cpp), where they inline. Nothing here runs before the run-time check.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_features.h"

#if PRMKERN_X86
#include <immintrin.h>
#endif

#define PK_INLINE inline __attribute__((always_inline))

namespace prmkern {

// 2^x for x <= 0 (softmax arguments in log2 units): x = n + r with n integer, |r| <= 1/2, 2^r by its degree-6
// Taylor polynomial in r ln 2 (relative error ~1.2e-7), 2^n put in the exponent bits. x <= -127 gives exactly 0
// (the empty state's m = -inf must weigh nothing).
constexpr float kExp2C[7] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                             0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f};

PK_INLINE float exp2_nonpos(float x) {
  x = std::max(x, -127.0f);
  const float n = std::floor(x + 0.5f);
  const float r = x - n;
  float p = kExp2C[6];
  for (int i = 5; i >= 0; --i) p = p * r + kExp2C[i];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

struct VecScalar {
  static constexpr int W = 8;
  struct T {
    float x[W];
  };
#define PK_LANES(expr)             \
  T o;                             \
  for (int i = 0; i < W; ++i) o.x[i] = (expr); \
  return o
  static PK_INLINE T zero() { PK_LANES(0.f); }
  static PK_INLINE T set1(float v) { PK_LANES(v); }
  static PK_INLINE T load(const float* p) { PK_LANES(p[i]); }
  static PK_INLINE void store(float* p, T a) { for (int i = 0; i < W; ++i) p[i] = a.x[i]; }
  static PK_INLINE T fma(T a, T b, T c) { PK_LANES(a.x[i] * b.x[i] + c.x[i]); }
  static PK_INLINE T mul(T a, T b) { PK_LANES(a.x[i] * b.x[i]); }
  static PK_INLINE T add(T a, T b) { PK_LANES(a.x[i] + b.x[i]); }
  static PK_INLINE T sub(T a, T b) { PK_LANES(a.x[i] - b.x[i]); }
  static PK_INLINE T max(T a, T b) { PK_LANES(std::max(a.x[i], b.x[i])); }
  static PK_INLINE T exp2(T a) { PK_LANES(exp2_nonpos(a.x[i])); }
#undef PK_LANES
  static PK_INLINE T lane_sums(const T* a) {  // lane p = sum of a[p]'s lanes, a[0 .. W)
    T o;
    for (int p = 0; p < W; ++p) {
      float x = 0.f;
      for (int i = 0; i < W; ++i) x += a[p].x[i];
      o.x[p] = x;
    }
    return o;
  }
  static PK_INLINE void convert(float* dst, const uint16_t* s, int64_t n, bool bf16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16 ? bf16_to_float(s[i]) : f16_to_float(s[i]);
  }
};

#if PRMKERN_X86
#define PK_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define PK_AVX512_INLINE inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))

struct Vec8 {
  static constexpr int W = 8;
  using T = __m256;
  static PK_AVX2_INLINE T zero() { return _mm256_setzero_ps(); }
  static PK_AVX2_INLINE T set1(float v) { return _mm256_set1_ps(v); }
  static PK_AVX2_INLINE T load(const float* p) { return _mm256_loadu_ps(p); }
  static PK_AVX2_INLINE void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static PK_AVX2_INLINE T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static PK_AVX2_INLINE T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static PK_AVX2_INLINE T add(T a, T b) { return _mm256_add_ps(a, b); }
  static PK_AVX2_INLINE T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static PK_AVX2_INLINE T max(T a, T b) { return _mm256_max_ps(a, b); }
  static PK_AVX2_INLINE T exp2(T x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(kExp2C[6]);
    for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2C[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  // Lane p = sum of a[p]'s lanes, for a[0 .. 8): pairs of vectors interleaved and added (ps, then pd), then the
  // 128-bit halves, 21 shuffles and adds in all.
  static PK_AVX2_INLINE T lane_sums(const T* a) {
    __m256 b[4], c[2];
    for (int i = 0; i < 4; ++i)
      b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d x = _mm256_castps_pd(b[2 * i]), y = _mm256_castps_pd(b[2 * i + 1]);
      c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
  }
  static PK_AVX2_INLINE void convert(float* dst, const uint16_t* s, int64_t n, bool bf16) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(dst + i, bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                     : _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) dst[i] = bf16 ? bf16_to_float(s[i]) : f16_to_float(s[i]);
  }
};

struct Vec16 {
  static constexpr int W = 16;
  using T = __m512;
  static PK_AVX512_INLINE T zero() { return _mm512_setzero_ps(); }
  static PK_AVX512_INLINE T set1(float v) { return _mm512_set1_ps(v); }
  static PK_AVX512_INLINE T load(const float* p) { return _mm512_loadu_ps(p); }
  static PK_AVX512_INLINE void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static PK_AVX512_INLINE T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static PK_AVX512_INLINE T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static PK_AVX512_INLINE T add(T a, T b) { return _mm512_add_ps(a, b); }
  static PK_AVX512_INLINE T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static PK_AVX512_INLINE T max(T a, T b) { return _mm512_max_ps(a, b); }
  static PK_AVX512_INLINE T exp2(T x) {  // the same polynomial as Vec8; 2^n by vscalefps (one op, not four)
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(kExp2C[6]);
    for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2C[i]));
    return _mm512_scalef_ps(p, n);
  }
  // Lane p = sum of a[p]'s lanes, for a[0 .. 16): as Vec8's, with two more levels over the 128-bit quarters (45
  // shuffles and adds for 16 dot products).
  static PK_AVX512_INLINE T lane_sums(const T* a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)
      b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // c[i], quarter j: the quarter-j sums of a[4i .. 4i+4)
      const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
      c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    constexpr int EVEN = _MM_SHUFFLE(2, 0, 2, 0), ODD = _MM_SHUFFLE(3, 1, 3, 1);
    for (int i = 0; i < 2; ++i)
      d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], EVEN),
                           _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], ODD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], EVEN), _mm512_shuffle_f32x4(d[0], d[1], ODD));
  }
  static PK_AVX512_INLINE void convert(float* dst, const uint16_t* s, int64_t n, bool bf16) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      _mm512_storeu_ps(dst + i, bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                     : _mm512_cvtph_ps(h));
    }
    for (; i < n; ++i) dst[i] = bf16 ? bf16_to_float(s[i]) : f16_to_float(s[i]);
  }
};
#endif

}  // namespace prmkern
