// Run-time CPU feature dispatch and the scalar types shared by the kernels. Kernels are compiled for a baseline
// x86-64 target; the AVX2/FMA/F16C code paths are functions carrying `PRMKERN_AVX2` (a GCC/Clang target attribute),
// entered only when `cpu_has_avx2()` says the running CPU has those instructions; likewise `PRMKERN_AVX512`
// (AVX-512 F/BW/VL/DQ) behind `cpu_isa_level() == Isa::Avx512`. No -march=native anywhere: one build runs on any
// x86-64 CPU (and compiles elsewhere, taking the portable paths). PRMKERN_ISA=avx2 or =scalar caps the level.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define PRMKERN_X86 1
#define PRMKERN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PRMKERN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define PRMKERN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define PRMKERN_X86 0
#define PRMKERN_AVX2
#define PRMKERN_AVX512
#define PRMKERN_AVX512_BF16
#endif

namespace prmkern {

// Element type of a weight or cache tensor (the activations the kernels compute with are float32).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa cpu_isa_level();    // the widest path this CPU (capped by PRMKERN_ISA) runs
bool cpu_has_avx2();    // AVX2 + FMA + F16C: the vector paths of this library (also true at the AVX-512 level)
bool cpu_has_avx512();  // AVX-512 F/BW/VL/DQ besides: the GEMM's and the decode attention's widest paths
const char* cpu_isa();  // "avx512", "avx2" or "scalar": cpu_isa_level() by name
// AVX-512 BF16 besides the AVX-512 level (vdpbf16ps: the bf16 x bf16 decode GEMM); PRMKERN_BF16_DOT=0 turns it off.
bool cpu_has_bf16_dot();

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// float -> IEEE half, round to nearest even (overflow to inf, subnormals exact, NaN stays NaN), portable; the
// classic bit-twiddling version (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {  // >= 65536 after rounding, inf or NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 113u << 23) {  // below the smallest normal half: let a float addition round the subnormal
    const uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float fu, magic;
    std::memcpy(&fu, &u, 4);
    std::memcpy(&magic, &magic_u, 4);
    fu += magic;
    std::memcpy(&u, &fu, 4);
    o = u - magic_u;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// IEEE half -> float, portable (the AVX2 paths use F16C instead).
inline float f16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Element i of a T array as float32, and back (the portable paths and tails of every kernel).
template <DType T>
inline float ld(const void* p, int64_t i) {
  if constexpr (T == DType::F32) return static_cast<const float*>(p)[i];
  else if constexpr (T == DType::BF16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  else return f16_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType T>
inline void st(void* p, int64_t i, float v) {
  if constexpr (T == DType::F32) static_cast<float*>(p)[i] = v;
  else if constexpr (T == DType::BF16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = float_to_f16(v);
}

template <DType T>
inline float round_to(float v) {  // the value after a store in T and a load back
  if constexpr (T == DType::F32) return v;
  else if constexpr (T == DType::BF16) return bf16_to_float(float_to_bf16(v));
  else return f16_to_float(float_to_f16(v));
}

}  // namespace prmkern
