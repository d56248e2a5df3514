// Decode GEMM on weights packed in column panels: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), for decode's few rows.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace prmkern {

// Output columns per panel: 3 vectors of 16 lanes (AVX-512), 6 of 8 (AVX2, in two halves).
constexpr int64_t kPanelCols = 48;

// panels: [ceil(N / 48), K, 48] of `wtype`, contiguous: panels[p][k][c] = w[48 p + c][k], zero past column N (see
// prmkern/models/decode_panels.py, which packs them). x: float32 [M, K] contiguous; bias: float32 [N] or null;
// y: float32 [M, N] with row stride ldy. Every output is one float32 chain of FMAs over k = 0 .. K-1, so a row's
// result does not depend on M, the thread count or the instruction set's vector width (only on FMA vs the
// portable path's multiply-add). Threads split the panels.
void panel_gemm(const float* x, int64_t M, int64_t K, const void* panels, DType wtype, int64_t N, const float* bias,
                float* y, int64_t ldy);

// bf16 x [M, K] (raw bits) against bf16 weights in pair panels [ceil(N/48), ceil(K/2), 48, 2] (pair_panels[p][kk][c][j]
// = w[48 p + c][2 kk + j], zero past N and K), with AVX-512 BF16 dot products (csrc/panel_bf16_dot.inc). Returns false,
// doing nothing, when the CPU lacks them (cpu_has_bf16_dot()).
bool panel_gemm_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* pair_panels, int64_t N,
                         const float* bias, float* y, int64_t ldy);

}  // namespace prmkern
