// The prefill GEMM for many activation rows against a weight in the checkpoint's layout (csrc/prefill_gemm.cpp).
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// y[M, N] (row stride ldy) = x[M, K] (float32, contiguous) @ w[N, K]^T (contiguous rows of `wtype`) + bias[N]
// (float32 or null). AVX2 + FMA blocked GEMM with packed, widened weight blocks; the portable loop elsewhere.
// Threads (OpenMP) split the outputs, each packing its own blocks (no barrier but the last).
void prefill_gemm(const float* x, int64_t M, int64_t K, const void* w, DType wtype, int64_t N, const float* bias,
                  float* y, int64_t ldy);

}  // namespace prmkern
