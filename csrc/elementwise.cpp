// Fused elementwise layers for the CPU decode step. A decode step's norms and activations are a few thousand
// elements each: their cost on the CPU is the number of torch ops (each a dispatch and, with threads, a fork/join),
// not arithmetic. In bf16 the torch reference RMSNorm is ~8 ops (upcast, square, mean, rsqrt, mul, downcast, mul,
// plus the residual add) and SiLU-and-mul 3; here each is one pass, single-threaded at decode sizes (rows split over
// threads at prefill sizes). Math in float32; values are rounded to the dtype where the torch reference rounds (the
// stored residual, the normalised value). Both run in AVX2 vectors where the CPU has them (8 lanes;
// the conversions of vec8.h), the portable loops elsewhere and for the last columns.
#include "elementwise.h"
#include "vec8.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#if PRMKERN_X86
#include <immintrin.h>
#endif

namespace prmkern {

namespace {

// Columns i0..H of one row (from `base`): the residual add (rounded to T, stored) and the sum of its squares, in
// double (H up to ~10^4 terms without drift; the cost is nothing here).
template <DType T>
double add_residual_sumsq(const void* x, const void* residual, void* res_out, int64_t base, int64_t i0, int64_t H) {
  double sumsq = 0.0;
  for (int64_t i = i0; i < H; ++i) {
    float v = ld<T>(x, base + i);
    if (residual != nullptr) {
      v = round_to<T>(v + ld<T>(residual, base + i));
      st<T>(res_out, base + i, v);
    }
    sumsq += static_cast<double>(v) * v;
  }
  return sumsq;
}

// Columns i0..H of one row: the normalised value (rounded to T, as torch's reference rounds it) times the weight.
template <DType T>
void scale_row(const void* src, const void* weight, float inv, void* out, int64_t base, int64_t i0, int64_t H) {
  for (int64_t i = i0; i < H; ++i) {
    const float normed = round_to<T>(ld<T>(src, base + i) * inv);
    st<T>(out, base + i, normed * ld<T>(weight, i));
  }
}

template <DType T>
void add_rms_norm_t(const void* x, const void* residual, const void* weight, int64_t rows, int64_t H, float eps,
                    void* out, void* res_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const double sumsq = add_residual_sumsq<T>(x, residual, res_out, r * H, 0, H);
    const float inv = static_cast<float>(1.0 / std::sqrt(sumsq / H + eps));
    scale_row<T>(residual != nullptr ? res_out : x, weight, inv, out, r * H, 0, H);
  }
}

template <DType T>
void silu_and_mul_t(const void* x, int64_t rows, int64_t I, void* out, int64_t i0 = 0) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = i0; i < I; ++i) {
      const float g = ld<T>(x, r * 2 * I + i), u = ld<T>(x, r * 2 * I + I + i);
      st<T>(out, r * I + i, g / (1.0f + std::exp(-g)) * u);
    }
  }
}

#if PRMKERN_X86
// exp(x) over 8 lanes: +inf above ln(FLT_MAX) (so that g / (1 + exp(-g)) is -0 for hugely negative g, as with
// std::exp), x clamped below at -87; Cody-Waite reduction by ln 2 and a degree-6 polynomial, relative error ~2e-7
// (std::exp's scalar calls were most of SiLU-and-mul's time). NaN in, NaN out.
PRMKERN_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n by building the exponent; n in [-126, 127] after the clamp.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(INFINITY), overflow);
}

// add_rms_norm_t in 8-lane vectors: the same roundings (the stored residual, the normalised value, the output, by
// vec8.h's conversions, bit for bit the scalar ones); the sum of squares in double lanes (each float32 square is
// exact in double, one rounding per add as in the scalar loop, in another order: the two agree to ~1e-16
// relative, far below the float32 rounding of the inverse norm). The last H % 8 columns by the scalar loops.
template <DType T>
PRMKERN_AVX2 void add_rms_norm_avx2(const void* x, const void* residual, const void* weight, int64_t rows,
                                    int64_t H, float eps, void* out, void* res_out) {
  const int64_t H8 = H - H % 8;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * H;
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (int64_t i = 0; i < H8; i += 8) {
      __m256 v = ld8<T>(x, base + i);
      if (residual != nullptr) {
        v = round8<T>(_mm256_add_ps(v, ld8<T>(residual, base + i)));
        st8<T>(res_out, base + i, v);
      }
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      s0 = _mm256_fmadd_pd(lo, lo, s0);
      s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    alignas(32) double part[4];
    _mm256_store_pd(part, _mm256_add_pd(s0, s1));
    const double sumsq = (part[0] + part[1]) + (part[2] + part[3]) +
                         add_residual_sumsq<T>(x, residual, res_out, base, H8, H);
    const float inv = static_cast<float>(1.0 / std::sqrt(sumsq / H + eps));
    const void* src = residual != nullptr ? res_out : x;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t i = 0; i < H8; i += 8) {
      const __m256 normed = round8<T>(_mm256_mul_ps(ld8<T>(src, base + i), vinv));
      st8<T>(out, base + i, _mm256_mul_ps(normed, ld8<T>(weight, i)));
    }
    scale_row<T>(src, weight, inv, out, base, H8, H);
  }
}

// SiLU-and-mul of the first I - I % 8 columns in 8-lane vectors, the rest by silu_and_mul_t.
template <DType T>
PRMKERN_AVX2 void silu_and_mul_avx2(const void* x, int64_t rows, int64_t I, void* out) {
  const int64_t I8 = I - I % 8;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < I8; i += 8) {
      const __m256 g = ld8<T>(x, r * 2 * I + i), u = ld8<T>(x, r * 2 * I + I + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
      st8<T>(out, r * I + i, y);
    }
  }
  if (I8 < I) silu_and_mul_t<T>(x, rows, I, out, I8);
}
#endif

// Calls fn(r0, r1) over row ranges: one range (this thread) for a decode step's few rows, where a fork/join would
// cost more than the pass; contiguous ranges over the threads for prefill-sized inputs (>= 2^17 elements: 512 x
// 2816 SiLU-and-mul took ~1 ms single-threaded, ~5% of a 39M model's 512-token prefill).
template <typename Fn>
void over_rows(int64_t T, int64_t row_elems, const Fn& fn) {
  const bool big = T * row_elems >= (int64_t{1} << 17);
  const int threads = big ? static_cast<int>(std::min<int64_t>(omp_get_max_threads(), T)) : 1;
  if (threads <= 1) return fn(int64_t{0}, T);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t r0 = T * t / threads, r1 = T * (t + 1) / threads;
    if (r0 < r1) fn(r0, r1);
  }
}

// Byte offset of row r of a [T, width] tensor of `dtype`.
inline int64_t row_bytes(DType dtype, int64_t width) { return width * (dtype == DType::F32 ? 4 : 2); }

}  // namespace

void add_rms_norm(const void* x, const void* residual, const void* weight, DType dtype, int64_t T, int64_t H,
                  float eps, void* out, void* res_out) {
  const int64_t rb = row_bytes(dtype, H);
  auto at = [&](const void* p, int64_t r) { return p == nullptr ? nullptr : static_cast<const char*>(p) + r * rb; };
  over_rows(T, H, [&](int64_t r0, int64_t r1) {
    void* o = static_cast<char*>(out) + r0 * rb;
    void* ro = res_out == nullptr ? nullptr : static_cast<char*>(res_out) + r0 * rb;
#if PRMKERN_X86
    if (cpu_has_avx2()) {
      if (dtype == DType::F32) add_rms_norm_avx2<DType::F32>(at(x, r0), at(residual, r0), weight, r1 - r0, H, eps, o, ro);
      else add_rms_norm_avx2<DType::BF16>(at(x, r0), at(residual, r0), weight, r1 - r0, H, eps, o, ro);
      return;
    }
#endif
    if (dtype == DType::F32) add_rms_norm_t<DType::F32>(at(x, r0), at(residual, r0), weight, r1 - r0, H, eps, o, ro);
    else add_rms_norm_t<DType::BF16>(at(x, r0), at(residual, r0), weight, r1 - r0, H, eps, o, ro);
  });
}

void silu_and_mul(const void* x, DType dtype, int64_t T, int64_t I, void* out) {
  const int64_t in_rb = row_bytes(dtype, 2 * I), out_rb = row_bytes(dtype, I);
  over_rows(T, 3 * I, [&](int64_t r0, int64_t r1) {
    const void* xs = static_cast<const char*>(x) + r0 * in_rb;
    void* os = static_cast<char*>(out) + r0 * out_rb;
#if PRMKERN_X86
    if (cpu_has_avx2()) {
      if (dtype == DType::F32) silu_and_mul_avx2<DType::F32>(xs, r1 - r0, I, os);
      else silu_and_mul_avx2<DType::BF16>(xs, r1 - r0, I, os);
      return;
    }
#endif
    if (dtype == DType::F32) silu_and_mul_t<DType::F32>(xs, r1 - r0, I, os);
    else silu_and_mul_t<DType::BF16>(xs, r1 - r0, I, os);
  });
}

}  // namespace prmkern
