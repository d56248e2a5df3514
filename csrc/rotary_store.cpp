// Fused rotary + KV store: one pass over a step's q, k, v instead of the torch backend's ~10 ops (gather the
// cos/sin rows, cat q and k, upcast, 4 muls, 2 adds, cat, downcast, then two indexed copies into the caches). A
// decode step moves a few thousand elements per layer, so on the CPU its cost was the op count, not the bytes.
//
// No FMA on purpose: `a*b - c*d` is two rounded products and a rounded difference, the same float32 arithmetic as
// torch's apply_rotary, bit for bit. The portable loops are compiled for baseline x86-64 (-O3 vectorizes them with
// SSE2); on an AVX2 CPU the same loops run in 8-lane vectors (vec8.h's conversions, compiled for AVX2 + F16C
// without FMA, so nothing can be contracted), with the portable loops for the last D % 8 (D / 2 % 8) elements.
// Prefill-sized inputs split their tokens over threads.
#include "rotary_store.h"

#include <vector>

#include "vec8.h"

namespace prmkern {
namespace {

// Rotates one head x [D] of dtype A into r [D] (float32, not yet rounded).
template <DType A>
inline void rotate(const void* x, const float* cs, int64_t D, float* r) {
  const int64_t half = D / 2;
  const float* c = cs;
  const float* s = cs + half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = ld<A>(x, i), x2 = ld<A>(x, i + half);
    const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
    r[i] = a - b;
    r[i + half] = e + f;
  }
}

#if PRMKERN_X86
#define PK_ROT_FN __attribute__((target("avx2,f16c")))
// rotate() in 8-lane vectors over the first D/2 - (D/2) % 8 pairs, the portable loop for the rest.
template <DType A>
PK_ROT_FN void rotate_avx2(const void* x, const float* cs, int64_t D, float* r) {
  const int64_t half = D / 2, half8 = half - half % 8;
  for (int64_t i = 0; i < half8; i += 8) {
    const __m256 x1 = ld8<A>(x, i), x2 = ld8<A>(x, i + half);
    const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
    _mm256_storeu_ps(r + i, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
    _mm256_storeu_ps(r + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
  }
  for (int64_t i = half8; i < half; ++i) {
    const float x1 = ld<A>(x, i), x2 = ld<A>(x, i + half);
    const float a = x1 * cs[i], b = x2 * cs[half + i], e = x2 * cs[i], f = x1 * cs[half + i];
    r[i] = a - b;
    r[i + half] = e + f;
  }
}

// r [D] (float32) rounded to A, stored as C at dst[o..o+D).
template <DType A, DType C>
PK_ROT_FN void store_avx2(const float* r, int64_t D, void* dst, int64_t o) {
  const int64_t D8 = D - D % 8;
  for (int64_t i = 0; i < D8; i += 8) st8<C>(dst, o + i, round8<A>(_mm256_loadu_ps(r + i)));
  for (int64_t i = D8; i < D; ++i) st<C>(dst, o + i, round_to<A>(r[i]));
}

template <DType A, DType C>
PK_ROT_FN void copy_avx2(const void* src, int64_t D, void* dst, int64_t o) {
  const int64_t D8 = D - D % 8;
  for (int64_t i = 0; i < D8; i += 8) st8<C>(dst, o + i, ld8<A>(src, i));
  for (int64_t i = D8; i < D; ++i) st<C>(dst, o + i, ld<A>(src, i));
}
#endif

template <DType A, bool Vec>
inline void rotate_any(const void* x, const float* cs, int64_t D, float* r) {
#if PRMKERN_X86
  if constexpr (Vec) return rotate_avx2<A>(x, cs, D, r);
#endif
  rotate<A>(x, cs, D, r);
}

template <DType A, DType C, bool Vec>
inline void store_rows(const float* r, int64_t D, void* dst, int64_t o) {
#if PRMKERN_X86
  if constexpr (Vec) return store_avx2<A, C>(r, D, dst, o);
#endif
  for (int64_t i = 0; i < D; ++i) st<C>(dst, o + i, round_to<A>(r[i]));
}

template <DType A, DType C, bool Vec>
inline void copy_row(const void* src, int64_t D, void* dst, int64_t o) {
#if PRMKERN_X86
  if constexpr (Vec) return copy_avx2<A, C>(src, D, dst, o);
#endif
  for (int64_t i = 0; i < D; ++i) st<C>(dst, o + i, ld<A>(src, i));
}

template <DType A, DType C, bool Vec>
void impl(const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v, int64_t v_stride,
          int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const int64_t* positions, const float* cos_sin, void* q_out,
          void* k_cache, void* v_cache, const int64_t* slots) {
  const int64_t esize = A == DType::F32 ? 4 : 2;
  const auto at = [&](const void* base, int64_t elems) { return static_cast<const char*>(base) + elems * esize; };
#pragma omp parallel if (T * (Hq + 2 * Hkv) * D >= (1 << 17))
  {
    std::vector<float> r(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* cs = cos_sin + positions[t] * D;
      for (int64_t h = 0; h < Hq; ++h) {
        rotate_any<A, Vec>(at(q, t * q_stride + h * D), cs, D, r.data());
        const int64_t o = (t * Hq + h) * D;
        store_rows<A, A, Vec>(r.data(), D, q_out, o);
      }
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t o = (slot * Hkv + h) * D;
        rotate_any<A, Vec>(at(k, t * k_stride + h * D), cs, D, r.data());
        store_rows<A, C, Vec>(r.data(), D, k_cache, o);  // rounded to the activations' dtype first, as stored
        copy_row<A, C, Vec>(at(v, t * v_stride + h * D), D, v_cache, o);
      }
    }
  }
}

template <DType A>
void dispatch_cache(DType cache, const void* q, int64_t qs, const void* k, int64_t ks, const void* v, int64_t vs,
                    int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const int64_t* pos, const float* cs, void* qo,
                    void* kc, void* vc, const int64_t* slots) {
  const bool vec = PRMKERN_X86 && cpu_has_avx2();
  switch (cache) {
    case DType::F32:
      if (vec) impl<A, DType::F32, true>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      else impl<A, DType::F32, false>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      break;
    case DType::BF16:
      if (vec) impl<A, DType::BF16, true>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      else impl<A, DType::BF16, false>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      break;
    case DType::F16:
      if (vec) impl<A, DType::F16, true>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      else impl<A, DType::F16, false>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots);
      break;
  }
}

}  // namespace

void rotary_store_kv(const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v,
                     int64_t v_stride, DType act, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                     const int64_t* positions, const float* cos_sin, void* q_out, void* k_cache, void* v_cache,
                     DType cache, const int64_t* slots) {
  switch (act) {
    case DType::F32:
      dispatch_cache<DType::F32>(cache, q, q_stride, k, k_stride, v, v_stride, T, Hq, Hkv, D, positions, cos_sin,
                                 q_out, k_cache, v_cache, slots);
      break;
    case DType::BF16:
      dispatch_cache<DType::BF16>(cache, q, q_stride, k, k_stride, v, v_stride, T, Hq, Hkv, D, positions, cos_sin,
                                  q_out, k_cache, v_cache, slots);
      break;
    case DType::F16:
      dispatch_cache<DType::F16>(cache, q, q_stride, k, k_stride, v, v_stride, T, Hq, Hkv, D, positions, cos_sin,
                                 q_out, k_cache, v_cache, slots);
      break;
  }
}

}  // namespace prmkern
