// A float scratch buffer on a 64-byte (cache-line) boundary, for the GEMMs' packed blocks.
//
// std::vector's storage comes from malloc, which aligns to 16 bytes only (a large block is an mmap'd page plus a
// 16-byte header), so an 8-lane (32-byte) load at every other 32-byte offset of a packed panel crossed a cache line.
// Split loads cost two L1 accesses; on the prefill GEMM's 16-output panels that was every other weight load.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace prmkern {

class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n) : p_(allocate(n)) {}
  float* get() const { return p_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  static float* allocate(int64_t n) {
    // aligned_alloc wants a size that is a multiple of the alignment
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<float*>(p);
  }
  std::unique_ptr<float, Free> p_;
};

}  // namespace prmkern
