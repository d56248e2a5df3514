// Run-time CPU feature dispatch and the scalar types shared by the kernels. Kernels are compiled for a baseline
// x86-64 target; the AVX2/FMA/F16C code paths are functions carrying `PRMKERN_AVX2` (a GCC/Clang target attribute),
// entered only when `cpu_has_avx2()` says the running CPU has those instructions. No -march=native anywhere: one
// build runs on any x86-64 CPU (and compiles elsewhere, taking the portable paths).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define PRMKERN_X86 1
#define PRMKERN_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PRMKERN_X86 0
#define PRMKERN_AVX2
#endif

namespace prmkern {

// Element type of a weight or cache tensor (the activations the kernels compute with are float32).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

bool cpu_has_avx2();    // AVX2 + FMA + F16C: the vector paths of this library
bool cpu_has_avx512();  // AVX-512F besides: the decode attention's widest path (the other kernels stop at AVX2)
const char* cpu_isa();  // "avx512", "avx2" or "scalar": the widest path the kernels take on this CPU

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
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

}  // namespace prmkern
