// Fused rotary embedding + paged KV-cache store for the decode (and prefill) step.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// T tokens. q [T, Hq, D], k / v [T, Hkv, D] of dtype `act` (heads of a token contiguous, tokens q_stride / k_stride
// / v_stride elements apart); positions [T]; cos_sin [max_positions, D] float32 = [cos | sin] over D/2 frequencies.
// Neox-style rotation of q and k by their token's row (in float32, products and sums rounded as torch rounds them):
//   out[:D/2] = x1 cos - x2 sin, out[D/2:] = x2 cos + x1 sin   with x1 = x[:D/2], x2 = x[D/2:].
// q_out [T, Hq, D] contiguous, `act`. Token t's rotated k (rounded to `act`) and its v go to the caches
// [num_blocks, block_size, Hkv, D] of `cache` dtype at flat slot slots[t], skipped when slots[t] < 0.
void rotary_store_kv(const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v,
                     int64_t v_stride, DType act, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                     const int64_t* positions, const float* cos_sin, void* q_out, void* k_cache, void* v_cache,
                     DType cache, const int64_t* slots);

}  // namespace prmkern
