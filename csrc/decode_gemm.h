// Weight-streaming GEMM for decode: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), a few rows M.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// x: float32 [M, K] contiguous; w: [N, K] of `wtype` with row stride ldw (elements, >= K), the output-major layout
// of a checkpoint; bias: float32 [N] or null; y: float32 [M, N] with row stride ldy. Threads split N.
void decode_gemm(const float* x, int64_t M, int64_t K, const void* w, DType wtype, int64_t N, int64_t ldw,
                 const float* bias, float* y, int64_t ldy);

// The same for bf16 x [M, K] (raw bits) and bf16 w: AVX-512 BF16 dot products (vdpbf16ps) when
// cpu_has_bf16_dot(), else x widened to float32 and decode_gemm; float32 accumulation; y float32.
void decode_gemm_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t ldw,
                          const float* bias, float* y, int64_t ldy);

}  // namespace prmkern
