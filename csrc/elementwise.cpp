// Fused elementwise layers for the CPU decode step. A decode step's norms and activations are a few thousand
// elements each: their cost on the CPU is the number of torch ops (each a dispatch and, with threads, a fork/join),
// not arithmetic. In bf16 the torch reference RMSNorm is ~8 ops (upcast, square, mean, rsqrt, mul, downcast, mul,
// plus the residual add) and SiLU-and-mul 3; here each is one single-threaded pass. Math in float32; values are
// rounded to the dtype where the torch reference rounds (the stored residual, the normalised value).
#include "elementwise.h"

#include <cmath>

namespace prmkern {

namespace {

template <DType T>
inline float ld(const void* p, int64_t i) {
  if constexpr (T == DType::F32) return static_cast<const float*>(p)[i];
  else return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType T>
inline float round_to(float v) {  // the value after a store in T
  if constexpr (T == DType::F32) return v;
  else return bf16_to_float(float_to_bf16(v));
}

template <DType T>
inline void st(void* p, int64_t i, float v) {
  if constexpr (T == DType::F32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}

template <DType T>
void add_rms_norm_t(const void* x, const void* residual, const void* weight, int64_t rows, int64_t H, float eps,
                    void* out, void* res_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * H;
    double sumsq = 0.0;  // double: H up to ~10^4 terms without drift; the cost is nothing here
    for (int64_t i = 0; i < H; ++i) {
      float v = ld<T>(x, base + i);
      if (residual != nullptr) {
        v = round_to<T>(v + ld<T>(residual, base + i));
        st<T>(res_out, base + i, v);
      }
      sumsq += static_cast<double>(v) * v;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(sumsq / H + eps));
    const void* src = residual != nullptr ? res_out : x;
    for (int64_t i = 0; i < H; ++i) {
      const float normed = round_to<T>(ld<T>(src, base + i) * inv);
      st<T>(out, base + i, normed * ld<T>(weight, i));
    }
  }
}

template <DType T>
void silu_and_mul_t(const void* x, int64_t rows, int64_t I, void* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < I; ++i) {
      const float g = ld<T>(x, r * 2 * I + i), u = ld<T>(x, r * 2 * I + I + i);
      st<T>(out, r * I + i, g / (1.0f + std::exp(-g)) * u);
    }
  }
}

}  // namespace

void add_rms_norm(const void* x, const void* residual, const void* weight, DType dtype, int64_t T, int64_t H,
                  float eps, void* out, void* res_out) {
  if (dtype == DType::F32) add_rms_norm_t<DType::F32>(x, residual, weight, T, H, eps, out, res_out);
  else add_rms_norm_t<DType::BF16>(x, residual, weight, T, H, eps, out, res_out);
}

void silu_and_mul(const void* x, DType dtype, int64_t T, int64_t I, void* out) {
  if (dtype == DType::F32) silu_and_mul_t<DType::F32>(x, T, I, out);
  else silu_and_mul_t<DType::BF16>(x, T, I, out);
}

}  // namespace prmkern
