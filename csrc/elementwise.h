// Fused elementwise layers of a decoder step: residual add + RMSNorm, and SiLU-and-mul.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// rows x [T, H] (+ residual [T, H] when given): res_out = x + residual (rounded to the dtype, as stored),
// out = round(round(res_out * rsqrt(mean(res_out^2) + eps)) * weight). dtype F32 or BF16; weight of the same dtype.
void add_rms_norm(const void* x, const void* residual, const void* weight, DType dtype, int64_t T, int64_t H,
                  float eps, void* out, void* res_out);

// x [T, 2I] = [gate | up] -> out [T, I] = silu(gate) * up, in float32, rounded once. dtype F32 or BF16.
void silu_and_mul(const void* x, DType dtype, int64_t T, int64_t I, void* out);

}  // namespace prmkern
