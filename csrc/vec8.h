// Eight float32 lanes loaded from and stored to f32 / bf16 / f16 arrays in AVX2 registers, bit for bit what the
// scalar `ld` / `st` / `round_to` of cpu_features.h give: bf16 rounds to nearest even with NaN kept quiet
// ((bits >> 16) | 0x40), f16 takes F16C's round-to-nearest-even with a NaN written as sign | 0x7e00 (F16C would
// keep the payload; the scalar path does not). Used by the elementwise kernels' and the rotary store's AVX2 paths.
//
// Every function carries `PK_V8_FN` = target("avx2,f16c") *without* FMA on purpose: a caller that must equal
// torch's rounded products and sums (the rotary, `a*b - c*d`) cannot have GCC contract them into FMAs when the
// target has none. A caller that wants FMA includes this header from an FMA-enabled function; the helpers are
// always_inline, so they compile into it.
#pragma once
#include "cpu_features.h"

#if PRMKERN_X86
#include <immintrin.h>

namespace prmkern {
namespace {

#define PK_V8_FN __attribute__((target("avx2,f16c"), always_inline)) inline

template <DType T>
PK_V8_FN __m256 ld8(const void* p, int64_t i) {
  if constexpr (T == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (T == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// float32 lanes -> their bf16 bits in the low half of each 32-bit lane (float_to_bf16, vectorised).
PK_V8_FN __m256i bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

// float32 lanes -> f16 bits (float_to_f16, vectorised), as 8 x uint16 in a 128-bit register.
PK_V8_FN __m128i f16_bits8(__m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (_mm256_testz_ps(nan, nan)) return h;
  // NaN lanes: sign | 0x7e00, as the scalar conversion writes them
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000));
  const __m256i qnan = _mm256_or_si256(sign, _mm256_set1_epi32(0x7e00));
  const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(qnan), _mm256_extracti128_si256(qnan, 1));
  const __m256i m32 = _mm256_castps_si256(nan);
  const __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m32), _mm256_extracti128_si256(m32, 1));
  return _mm_blendv_epi8(h, q16, m16);
}

// 8 lanes of 16-bit values in the low halves of 32-bit lanes -> 8 x uint16.
PK_V8_FN __m128i pack16(__m256i lanes) {
  return _mm_packus_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
}

template <DType T>
PK_V8_FN void st8(void* p, int64_t i, __m256 v) {
  if constexpr (T == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  } else {
    const __m128i h = T == DType::BF16 ? pack16(bf16_bits8(v)) : f16_bits8(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
  }
}

// The lanes after a store in T and a load back (round_to, vectorised).
template <DType T>
PK_V8_FN __m256 round8(__m256 v) {
  if constexpr (T == DType::F32) return v;
  else if constexpr (T == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
  else return _mm256_cvtph_ps(f16_bits8(v));
}

}  // namespace
}  // namespace prmkern
#endif
