// The CPU sampler's draw (prmkern/sampler.py's inverse-CDF step) in one C++ call per decode step.
//
// The torch version runs softmax, cumsum and two searchsorted over [R, V] (a 151,936-token vocabulary is 0.6 MB a
// row): ~0.5-1 ms a step of 16 rows on 2 cores, 5-10% of a decode step of a small verifier. Here each row is read
// three times from L2: the max (and a NaN / +inf check), exp of the shifted row into a scratch row with a float sum
// per block of 64, and the search: whole blocks by their sums, then token by token inside the block the target
// falls in. Cumulative sums are double. exp is attention_vec.h's exp2 (relative error ~1.2e-7, as float32 softmax).
#include "sampling.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_vec.h"

namespace prmkern {
namespace {

constexpr int64_t BLOCK = 64;  // tokens per block sum: the search's last stage scans at most one block
constexpr float LOG2E = 1.4426950408889634f;

// Row scratch: e [V] the weights exp(x - max), sums [ceil(V / BLOCK)] their block sums.
struct RowScratch {
  std::vector<float> e;
  std::vector<double> sums;
};

// Pass 1: max of x / t over the row; bad = a NaN or +inf among them.
float row_max_scalar(const float* x, int64_t V, float t, bool& bad) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    const float y = x[i] / t;
    if (std::isnan(y) || y == std::numeric_limits<float>::infinity()) bad = true;
    m = std::max(m, y);
  }
  return m;
}

// Pass 2: e[i] = exp(x[i] / t - m), block sums into `sums`; returns the row total (double over the blocks).
double row_weights_scalar(const float* x, int64_t V, float t, float m, float* e, double* sums) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += BLOCK) {
    float s = 0.f;
    for (int64_t i = b0; i < std::min(V, b0 + BLOCK); ++i) {
      e[i] = exp2_nonpos((x[i] / t - m) * LOG2E);
      s += e[i];
    }
    sums[b0 / BLOCK] = s;
    total += s;
  }
  return total;
}

#if PRMKERN_X86
PRMKERN_AVX2 float row_max_avx2(const float* x, int64_t V, float t, bool& bad) {
  const __m256 tv = _mm256_set1_ps(t), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), flag = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), tv);
    // max_ps drops a NaN operand: NaN and +inf are flagged separately
    flag = _mm256_or_ps(flag, _mm256_or_ps(_mm256_cmp_ps(y, y, _CMP_UNORD_Q), _mm256_cmp_ps(y, inf, _CMP_EQ_OQ)));
    mx = _mm256_max_ps(mx, y);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float m = *std::max_element(lanes, lanes + 8);
  bad = bad || _mm256_movemask_ps(flag) != 0;
  return std::max(m, row_max_scalar(x + i, V - i, t, bad));
}

PRMKERN_AVX2 double row_weights_avx2(const float* x, int64_t V, float t, float m, float* e, double* sums) {
  const __m256 tv = _mm256_set1_ps(t), mv = _mm256_set1_ps(m), l2e = _mm256_set1_ps(LOG2E);
  double total = 0.0;
  int64_t b0 = 0;
  for (; b0 + BLOCK <= V; b0 += BLOCK) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = b0; i < b0 + BLOCK; i += 8) {
      const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), tv);
      const __m256 w = Vec8::exp2(_mm256_mul_ps(_mm256_sub_ps(y, mv), l2e));
      _mm256_storeu_ps(e + i, w);
      s = _mm256_add_ps(s, w);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    const float bs = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    sums[b0 / BLOCK] = bs;
    total += bs;
  }
  if (b0 < V) total += row_weights_scalar(x + b0, V - b0, t, m, e + b0, sums + b0 / BLOCK);
  return total;
}
#endif

// One row: returns the token, or -1 when nothing can be drawn (ok = 0).
int64_t draw_row(const float* x, int64_t V, float t, double u, RowScratch& s) {
  bool bad = false;
#if PRMKERN_X86
  const bool vec = cpu_has_avx2();
#else
  const bool vec = false;
#endif
  float m;
  double total;
  s.e.resize(V);
  s.sums.resize((V + BLOCK - 1) / BLOCK);
#if PRMKERN_X86
  if (vec) {
    m = row_max_avx2(x, V, t, bad);
    if (bad || !std::isfinite(m)) return -1;
    total = row_weights_avx2(x, V, t, m, s.e.data(), s.sums.data());
  } else
#endif
  {
    m = row_max_scalar(x, V, t, bad);
    if (bad || !std::isfinite(m)) return -1;
    total = row_weights_scalar(x, V, t, m, s.e.data(), s.sums.data());
  }
  if (!(total > 0.0) || !std::isfinite(total)) return -1;
  const double target = u * total;
  // Whole blocks while the target lies past them, then token by token: the first token whose cumulative weight
  // exceeds the target (a weight-0 token never does). The block sums were float: if rounding put the target just
  // past a block's tokens, the scan simply runs on into the next block.
  double cum = 0.0;
  int64_t b = 0;
  const int64_t nb = static_cast<int64_t>(s.sums.size());
  while (b < nb - 1 && cum + s.sums[b] <= target) cum += s.sums[b++];
  for (int64_t i = b * BLOCK; i < V; ++i) {
    cum += s.e[i];
    if (cum > target) return i;
  }
  // u x total rounded past the running sum at the row's end: the last token with a non-zero weight.
  for (int64_t i = V - 1; i >= 0; --i)
    if (s.e[i] > 0.f) return i;
  return -1;
}

}  // namespace

void sample_rows(const float* logits, int64_t R, int64_t V, int64_t ld, const float* temperature, const double* u,
                 int64_t* tokens, uint8_t* ok) {
  // Rows split over threads: a row is ~V x 3 reads from L2, worth a thread from 2 rows of a 32K vocabulary.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), R * V / 32768)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    RowScratch s;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float t = temperature != nullptr ? temperature[r] : 1.0f;
      const int64_t tok = draw_row(logits + r * ld, V, t, u[r], s);
      tokens[r] = tok < 0 ? 0 : tok;
      ok[r] = tok >= 0;
    }
  }
}

}  // namespace prmkern
