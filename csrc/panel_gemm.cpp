// Decode GEMM on weights packed in column panels of 48 outputs: [ceil(N/48), K, 48] (prmkern/models/decode_panels.py).
//
// The output-major GEMM (decode_gemm.cpp) takes dot products: each output's K products are spread over the lanes
// of a vector and reduced at the end, which costs shuffles per output and keeps the activation rows in registers
// (6 of 32 on AVX-512). A panel puts 48 outputs' weights for one k side by side instead, so each k is 3 vector
// loads of weights and one broadcast per activation row, feeding 3 x 8 accumulators of 16 outputs: no reduction,
// and one more FMA per register. Measured against the output-major GEMM (AMD EPYC Zen 4, 2 threads, fp32, weights
// streamed from memory): 1.1-1.5x on the 39M model's LM head, gate_up and qkv at 16 rows, 0.87-1.05x on its
// 512 x 1408 down projection, and ~196-205 GFLOP/s at 512-2048 rows against MKL's 142-198 (docs/cpu_kernels.md).
// The cost is a copy of each weight the runner packs (the checkpoint's tensor stays), so packing is under the
// packed-weight budget, and only for the AVX-512 path: the AVX2 tiles (3 x 4 in 16 registers) did not beat the
// output-major GEMM.
//
// Every output is one chain of FMAs over k in order, so a row's float32 result is the same at any row count,
// thread count or vector width: decode through panels is batch-invariant.
#include "panel_gemm.h"

#include <algorithm>

#include "gemm_vectors.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace prmkern {
namespace {

template <DType T>
void panel_range_scalar(const float* x, int64_t M, int64_t K, const void* panels, const float* bias, float* y,
                        int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t col = n0; col < n1; ++col) {
    const int64_t panel_bytes = K * kPanelCols * (T == DType::F32 ? 4 : 2);
    const void* panel = static_cast<const char*>(panels) + col / kPanelCols * panel_bytes;
    const int64_t c = col % kPanelCols;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += ld<T>(panel, k * kPanelCols + c) * xr[k];
      y[m * ldy + col] = acc + (bias != nullptr ? bias[col] : 0.f);
    }
  }
}

}  // namespace

#if PRMKERN_X86
namespace {
#define PK_FN PRMKERN_AVX2
namespace avx2_panels {
using V = Avx2;
#include "panel_tile_loops.inc"
}  // namespace avx2_panels
#undef PK_FN
#define PK_FN PRMKERN_AVX512
namespace avx512_panels {
using V = Avx512;
#include "panel_tile_loops.inc"
}  // namespace avx512_panels
#undef PK_FN
#include "panel_bf16_dot.inc"  // the bf16 pair-panel tiles (use avx512_panels::store_tile)
}  // namespace
#endif

namespace {

// Splits the N columns over threads in units of 16 (a vector of either ISA), not whole panels (the 512 outputs of a
// down projection are 10 2/3 panels, 6 : 5 between 2 threads, 12% idle), and each thread's columns into row blocks
// of at most ROW_BLOCK_BYTES of activations, which every pass over a panel re-reads from cache (each block streams
// the weights once more; decode's few rows are one block). Calls range(n0, n1, m0, rows).
template <class Range>
void split_work(int64_t M, int64_t K, int64_t N, int64_t x_elem_bytes, const Range& range) {
  constexpr int64_t UNIT = 16, ROW_BLOCK_BYTES = 1 << 20;
  const int64_t units = (N + UNIT - 1) / UNIT;
  const int64_t rows_per_block =
      std::max<int64_t>(8, ROW_BLOCK_BYTES / (x_elem_bytes * std::max<int64_t>(K, 1)) / 8 * 8);
  int threads = 1;
#ifdef _OPENMP
  // Work per thread must cover the fork/join (a few us): below ~64K weights per thread, fewer threads.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({omp_get_max_threads(), units, N * K / 65536})));
#endif
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t n0 = std::min(N, units * t / threads * UNIT), n1 = std::min(N, units * (t + 1) / threads * UNIT);
    for (int64_t m0 = 0; m0 < M && n0 < n1; m0 += rows_per_block) range(n0, n1, m0, std::min(rows_per_block, M - m0));
  }
}

template <DType T>
void panel_dispatch(const float* x, int64_t M, int64_t K, const void* panels, int64_t N, const float* bias, float* y,
                    int64_t ldy) {
  const Isa isa = cpu_isa_level();
  split_work(M, K, N, 4, [&](int64_t n0, int64_t n1, int64_t m0, int64_t rows) {
    const float* xb = x + m0 * K;
    float* yb = y + m0 * ldy;
#if PRMKERN_X86
    if (isa == Isa::Avx512) return avx512_panels::panel_range<T>(xb, rows, K, panels, bias, yb, ldy, n0, n1);
    if (isa == Isa::Avx2) return avx2_panels::panel_range<T>(xb, rows, K, panels, bias, yb, ldy, n0, n1);
#endif
    (void)isa;
    panel_range_scalar<T>(xb, rows, K, panels, bias, yb, ldy, n0, n1);
  });
}

}  // namespace

void panel_gemm(const float* x, int64_t M, int64_t K, const void* panels, DType wtype, int64_t N, const float* bias,
                float* y, int64_t ldy) {
  switch (wtype) {
    case DType::F32: panel_dispatch<DType::F32>(x, M, K, panels, N, bias, y, ldy); break;
    case DType::BF16: panel_dispatch<DType::BF16>(x, M, K, panels, N, bias, y, ldy); break;
    case DType::F16: panel_dispatch<DType::F16>(x, M, K, panels, N, bias, y, ldy); break;
  }
}

bool panel_gemm_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* pair_panels, int64_t N,
                         const float* bias, float* y, int64_t ldy) {
#if PRMKERN_X86
  if (!cpu_has_bf16_dot()) return false;
  split_work(M, K, N, 2, [&](int64_t n0, int64_t n1, int64_t m0, int64_t rows) {
    pair_panel_range(x + m0 * K, rows, K, pair_panels, bias, y + m0 * ldy, ldy, n0, n1);
  });
  return true;
#else
  (void)x, (void)M, (void)K, (void)pair_panels, (void)N, (void)bias, (void)y, (void)ldy;
  return false;
#endif
}

}  // namespace prmkern
