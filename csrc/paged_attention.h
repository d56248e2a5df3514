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

// Causal attention of a prefill's new tokens, every key read in place from the pool (the new tokens' K/V already
// stored). q: float32 [T, Hq, D]; sequence s owns rows cu_seqlens_q[s] .. cu_seqlens_q[s+1] (its new tokens), its
// KV is seq_lens[s] tokens in block_tables[s, :] (row stride table_stride), and new token i sits at position
// seq_lens[s] - q_len + i, seeing keys 0 .. that position (a cached prefix included). out: float32 [T, Hq, D].
void prefill_attention(const float* q, int64_t T, int64_t Hq, int64_t D, const void* k_cache, const void* v_cache,
                       DType ctype, int64_t block_size, int64_t Hkv, int64_t num_seqs, const int32_t* cu_seqlens_q,
                       const int32_t* seq_lens, const int32_t* block_tables, int64_t table_stride, float scale,
                       float* out, const char* isa = nullptr);

}  // namespace prmkern
