// CPU feature detection for run-time dispatch (see cpu_features.h). PRMKERN_ISA=scalar forces the portable paths,
// PRMKERN_ISA=avx2 stops at AVX2 on an AVX-512 CPU (tests run every path on one machine).
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace prmkern {

static bool detect_avx2() {
  const char* force = std::getenv("PRMKERN_ISA");
  if (force != nullptr && std::strcmp(force, "scalar") == 0) return false;
#if PRMKERN_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool detect_avx512() {
  const char* force = std::getenv("PRMKERN_ISA");
  if (force != nullptr && (std::strcmp(force, "scalar") == 0 || std::strcmp(force, "avx2") == 0)) return false;
#if PRMKERN_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return detect_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
  static const bool has = detect_avx2();
  return has;
}

bool cpu_has_avx512() {
  static const bool has = detect_avx512();
  return has;
}

const char* cpu_isa() { return cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "scalar"; }

}  // namespace prmkern
