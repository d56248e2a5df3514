// Cascade paged decode attention over the block pool, read in place.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// One new token per chain. q: float32 [B, Hq, D]; caches: [num_blocks, block_size, Hkv, D] of `ctype`.
// Chains are ordered by group: group g owns rows group_starts[g] .. group_starts[g+1] and its chains share
// prefix_lens[g] leading tokens (blocks prefix_tables[g, :], row stride prefix_stride); chain b's own tokens are
// suffix_lens[b] tokens in suffix_tables[b, :] (row stride suffix_stride). out: float32 [B, Hq, D].
// isa: "scalar", "avx2" or "avx512" forces that path (the caller checks the CPU has it); nullptr or "" = cpu_isa().
void cascade_decode(const float* q, int64_t B, int64_t Hq, int64_t D, const void* k_cache, const void* v_cache,
                    DType ctype, int64_t block_size, int64_t Hkv, int64_t num_groups, const int32_t* group_starts,
                    const int32_t* prefix_lens, const int32_t* prefix_tables, int64_t prefix_stride,
                    const int32_t* suffix_lens, const int32_t* suffix_tables, int64_t suffix_stride, float scale,
                    float* out, const char* isa = nullptr);

}  // namespace prmkern
