// The prefill GEMM: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for many rows (a prompt's tokens), with the weight in
// the checkpoint's layout and dtype (fp32, bf16 or fp16), in the blocked form of BLIS / GotoBLAS: for each block of
// KC depths x NC outputs, the weight block is widened to fp32 and packed once into panels of 16 outputs
// ([NC/16][KC][16]), and blocks of MC activation rows into panels of 6 rows ([MC/6][KC][6]), and the 6 x 16
// register tile runs over them: 12 accumulators of 8 lanes, per depth 2 weight
// loads, 6 broadcasts and 12 FMAs (15 of the 16 AVX2 registers). The packed blocks stay in L1 (a 16-output panel:
// KC x 64 bytes) and L2 (the activation block), so the FMA ports, not memory, set the pace. AVX2 only: on an
// AVX-512 BF16 CPU the pair-panel GEMM (panel_gemm.cpp) multiplies bf16 natively; without AVX2 the portable loop.
// Written for prmkern after BLIS's design (Van Zee and van de Geijn, 2015); no code taken.
//
// Measured 2026-12-07, AMD EPYC (Zen 3, AVX2), 1024 rows, best of 5 (scratch timing of `_C.prefill_linear`, wall
// clock): one thread on a 2048 x 1536 bf16 weight 49.6 -> 60.8 GFLOP/s (fp32 weight 59.4 -> 62.3; the FMA peak
// measured beside it 91-93) from the vectorized panel packing and the cache-line-aligned blocks; two threads on
// the 1.5B model's projections 82-91 -> 91-100 GFLOP/s (the machine is shared: +-15% between identical runs).
#include "prefill_gemm.h"

#include "aligned_buffer.h"
#include "gemm_vectors.h"  // Avx2::loadw: 8 weights of any dtype as 8 float lanes

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif
#if PRMKERN_X86
#include <immintrin.h>
#endif

namespace prmkern {
namespace {

constexpr int64_t MR = 6, NR = 16, KC = 256, MC = 96, NC = 1536;

template <DType T>
void gemm_scalar(const float* x, int64_t M, int64_t K, const void* w, int64_t N, const float* bias, float* y,
                 int64_t ldy) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = n * K;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * ld<T>(w, row + k);
      y[m * ldy + n] = acc + (bias != nullptr ? bias[n] : 0.f);
    }
  }
}

#if PRMKERN_X86
// r[i][j] -> r[j][i] for an 8 x 8 float block in 8 registers.
PRMKERN_AVX2 inline void transpose8x8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// One full panel: 16 weight rows (element offsets base[0..15]) x kc depths into dst[k][16], widened. Eight depths
// of eight rows at a time are loaded along the rows (contiguous) and transposed in registers: per 64 weights 8
// vector loads, 8 widenings, 24 shuffles and 8 vector stores, where the element-by-element copy took 64 scalar
// loads, conversions and stores.
template <DType T>
PRMKERN_AVX2 void pack_panel(const void* w, const int64_t* base, int64_t kc, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8)
    for (int h = 0; h < 2; ++h) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) r[c] = Avx2::loadw<T>(w, base[h * 8 + c] + k);  // 8 weights, widened
      transpose8x8(r);  // r[d] = depth k + d of rows h * 8 .. h * 8 + 7
#pragma GCC unroll 8
      for (int d = 0; d < 8; ++d) _mm256_storeu_ps(dst + (k + d) * NR + h * 8, r[d]);
    }
  for (; k < kc; ++k)
    for (int64_t c = 0; c < NR; ++c) dst[k * NR + c] = ld<T>(w, base[c] + k);
}

// w[n0 + n][k0 + k] for n < nc, k < kc, widened, into bp[n / 16][k][n % 16] (panels j0 .. j1 - 1); zero past nc
// (a partial last panel).
template <DType T>
void pack_weights(const void* w, int64_t K, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* bp, int64_t j0,
                  int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float* dst = bp + j * kc * NR;
    const int64_t cols = std::min(NR, nc - j * NR);
    int64_t base[NR];
    for (int64_t c = 0; c < cols; ++c) base[c] = (n0 + j * NR + c) * K + k0;
    if (cols == NR) {
      pack_panel<T>(w, base, kc, dst);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t c = 0; c < NR; ++c) dst[k * NR + c] = c < cols ? ld<T>(w, base[c] + k) : 0.f;
    }
  }
}

// x[m0 + i][k0 + k] for i < mc into ap[i / 6][k][i % 6]; zero rows past mc. Written in order.
void pack_rows(const float* x, int64_t K, int64_t m0, int64_t mc, int64_t k0, int64_t kc, float* ap) {
  for (int64_t p = 0; p * MR < mc; ++p) {
    float* dst = ap + p * kc * MR;
    const int64_t rows = std::min(MR, mc - p * MR);
    const float* src[MR];
    for (int64_t i = 0; i < rows; ++i) src[i] = x + (m0 + p * MR + i) * K + k0;
    if (rows == MR) {
      for (int64_t k = 0; k < kc; ++k)
#pragma GCC unroll 6
        for (int64_t i = 0; i < MR; ++i) dst[k * MR + i] = src[i][k];
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? src[i][k] : 0.f;
    }
  }
}

// c[6][16] (row stride ldc) (+)= a-panel [kc][6] x b-panel [kc][16]; `rows` / `cols` of the tile are real (the rest
// lands in a scratch tile); `first`: store, else add to what is there.
PRMKERN_AVX2 void tile_6x16(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int64_t rows,
                            int64_t cols, bool first) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  // The output tile is read (or written) after the loop; its lines come from L3 or memory (the output of a prefill
  // product is megabytes), so they are requested now, while the FMAs run.
  for (int64_t i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_set1_ps(a[k * MR + i]);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (rows == MR && cols == NR) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (first) {
        _mm256_storeu_ps(ci, acc[i][0]);
        _mm256_storeu_ps(ci + 8, acc[i][1]);
      } else {
        _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][0]));
        _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_loadu_ps(ci + 8), acc[i][1]));
      }
    }
    return;
  }
  alignas(32) float t[MR][NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t[i], acc[i][0]);
    _mm256_store_ps(t[i] + 8, acc[i][1]);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) c[i * ldc + j] = first ? t[i][j] : c[i * ldc + j] + t[i][j];
}

// One thread's share: outputs [n_begin, n_end), every row. Each thread packs its own weight and activation blocks,
// so the threads never wait for each other (on a shared machine a descheduled thread would stall a barrier).
template <DType T>
void gemm_avx2_range(const float* x, int64_t M, int64_t K, const void* w, int64_t n_begin, int64_t n_end, float* y,
                     int64_t ldy, float* bp, float* ap) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NC) {
    const int64_t nc = std::min(NC, n_end - n0), panels = (nc + NR - 1) / NR;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      pack_weights<T>(w, K, n0, nc, k0, kc, bp, 0, panels);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, M - m0);
        pack_rows(x, K, m0, mc, k0, kc, ap);
        for (int64_t j = 0; j < panels; ++j) {
          const int64_t cols = std::min(NR, nc - j * NR);
          for (int64_t p = 0; p * MR < mc; ++p)
            tile_6x16(ap + p * kc * MR, bp + j * kc * NR, kc, y + (m0 + p * MR) * ldy + n0 + j * NR, ldy,
                      std::min(MR, mc - p * MR), cols, k0 == 0);
        }
      }
    }
  }
}

template <DType T>
void gemm_avx2(const float* x, int64_t M, int64_t K, const void* w, int64_t N, const float* bias, float* y,
               int64_t ldy) {
  const int64_t units = (N + NR - 1) / NR;  // outputs are split over threads in whole 16-output panels
  int threads = 1;
#ifdef _OPENMP
  // at least ~4 MFLOP per thread, or fewer threads
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({omp_get_max_threads(), units,
                                                                      M * N * K / (1 << 21) + 1})));
#endif
#pragma omp parallel num_threads(threads)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    // 1.5 MiB + 96 KiB, on 64-byte boundaries: a 16-output panel row is then one cache line, and its two 8-lane
    // loads never split a line (with malloc's 16-byte alignment every other one did)
    AlignedFloats bp(NC * KC), ap(MC * KC);
    const int64_t n_begin = std::min(N, units * t / threads * NR), n_end = std::min(N, units * (t + 1) / threads * NR);
    if (n_begin < n_end) gemm_avx2_range<T>(x, M, K, w, n_begin, n_end, y, ldy, bp.get(), ap.get());
    if (bias != nullptr) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n_begin; n < n_end; ++n) y[m * ldy + n] += bias[n];
    }
  }
}
#endif

template <DType T>
void dispatch(const float* x, int64_t M, int64_t K, const void* w, int64_t N, const float* bias, float* y,
              int64_t ldy) {
#if PRMKERN_X86
  if (cpu_has_avx2()) return gemm_avx2<T>(x, M, K, w, N, bias, y, ldy);
#endif
  gemm_scalar<T>(x, M, K, w, N, bias, y, ldy);
}

}  // namespace

void prefill_gemm(const float* x, int64_t M, int64_t K, const void* w, DType wtype, int64_t N, const float* bias,
                  float* y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: the bias alone
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = bias != nullptr ? bias[n] : 0.f;
    return;
  }
  switch (wtype) {
    case DType::F32: dispatch<DType::F32>(x, M, K, w, N, bias, y, ldy); break;
    case DType::BF16: dispatch<DType::BF16>(x, M, K, w, N, bias, y, ldy); break;
    case DType::F16: dispatch<DType::F16>(x, M, K, w, N, bias, y, ldy); break;
  }
}

}  // namespace prmkern
