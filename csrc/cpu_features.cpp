// CPU feature detection for run-time dispatch (see cpu_features.h). PRMKERN_ISA caps the level: "scalar" forces
// the portable paths, "avx2" the AVX2 ones on an AVX-512 CPU (tests run every level the machine has);
// PRMKERN_BF16_DOT=0 keeps an AVX-512 BF16 CPU off the bf16 dot-product GEMM.
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace prmkern {

static Isa detect_isa() {
  Isa cap = Isa::Avx512;
  if (const char* force = std::getenv("PRMKERN_ISA")) {
    if (std::strcmp(force, "scalar") == 0) cap = Isa::Scalar;
    else if (std::strcmp(force, "avx2") == 0) cap = Isa::Avx2;
  }
#if PRMKERN_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0) for AVX / AVX-512.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const Isa have = avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Scalar;
  return static_cast<int>(have) < static_cast<int>(cap) ? have : cap;
#else
  (void)cap;
  return Isa::Scalar;
#endif
}

Isa cpu_isa_level() {
  static const Isa level = detect_isa();
  return level;
}

bool cpu_has_avx2() { return cpu_isa_level() != Isa::Scalar; }

bool cpu_has_avx512() { return cpu_isa_level() == Isa::Avx512; }

static bool detect_bf16_dot() {
  const char* off = std::getenv("PRMKERN_BF16_DOT");
  if (off != nullptr && std::strcmp(off, "0") == 0) return false;
#if PRMKERN_X86 && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_bf16_dot() {
  static const bool has = detect_bf16_dot();
  return has;
}

const char* cpu_isa() {
  switch (cpu_isa_level()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace prmkern
