// Fused rotary + KV store: one pass over a step's q, k, v instead of the torch backend's ~10 ops (gather the
// cos/sin rows, cat q and k, upcast, 4 muls, 2 adds, cat, downcast, then two indexed copies into the caches). A
// decode step moves a few thousand elements per layer, so on the CPU its cost was the op count, not the bytes.
//
// Portable code on purpose: it is compiled for baseline x86-64 (no FMA), so `a*b - c*d` is two rounded products and
// a rounded difference, the same float32 arithmetic as torch's apply_rotary, bit for bit (and -O3 vectorizes the
// loops with SSE2). Prefill-sized inputs split their tokens over threads.
#include "rotary_store.h"

#include <vector>

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

template <DType A, DType C>
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
        rotate<A>(at(q, t * q_stride + h * D), cs, D, r.data());
        const int64_t o = (t * Hq + h) * D;
        for (int64_t i = 0; i < D; ++i) st<A>(q_out, o + i, r[i]);
      }
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t o = (slot * Hkv + h) * D;
        rotate<A>(at(k, t * k_stride + h * D), cs, D, r.data());
        for (int64_t i = 0; i < D; ++i) st<C>(k_cache, o + i, round_to<A>(r[i]));
        const void* vh = at(v, t * v_stride + h * D);
        for (int64_t i = 0; i < D; ++i) st<C>(v_cache, o + i, ld<A>(vh, i));
      }
    }
  }
}

template <DType A>
void dispatch_cache(DType cache, const void* q, int64_t qs, const void* k, int64_t ks, const void* v, int64_t vs,
                    int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const int64_t* pos, const float* cs, void* qo,
                    void* kc, void* vc, const int64_t* slots) {
  switch (cache) {
    case DType::F32: impl<A, DType::F32>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots); break;
    case DType::BF16: impl<A, DType::BF16>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots); break;
    case DType::F16: impl<A, DType::F16>(q, qs, k, ks, v, vs, T, Hq, Hkv, D, pos, cs, qo, kc, vc, slots); break;
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
