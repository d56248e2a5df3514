// Cascade paged decode attention on the CPU, reading K/V in place from the block pool.
//
// Each group's shared prefix is attended by all of its chains x query heads of one KV head at once: the prefix
// K/V is read from memory once per group and step (not once per chain), in chunks of CHUNK tokens converted to
// float32 in an L1-resident buffer, against every query of the group (flash-attention style online softmax,
// float32 running max / sum). Each chain's own suffix is then attended the same way by its GQA query heads, and
// the two partial states are merged by log-sum-exp. No gathered copy of the cache is made, and only slots inside
// a sequence's length are read (never-written pool slots may hold anything, NaN included).
// Threads split the (group, KV head) prefix tasks, then the (chain, KV head) suffix tasks.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if PRMKERN_X86
#include <immintrin.h>
#endif

#define PK_INLINE inline __attribute__((always_inline))

namespace prmkern {

namespace {

constexpr int CHUNK = 32;  // keys per converted chunk: 2 x 32 x D floats stay in L1 for D <= 128
}  // namespace
}  // namespace prmkern

#include "attention_tiles.h"  // the AVX2 score and P@V tiles over one chunk (uses CHUNK)

namespace prmkern {
namespace {

// exp(x) for x <= 0 (softmax arguments), branch-free so that loops over it vectorize; relative error ~2e-7.
PK_INLINE float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;  // x / ln 2
  const float n = std::floor(t + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;  // x - n ln2, two-part ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <DType T>
PK_INLINE void convert_row_scalar(float* dst, const void* src, int64_t n) {
  if constexpr (T == DType::F32) {
    std::memcpy(dst, src, n * 4);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = T == DType::BF16 ? bf16_to_float(s[i]) : f16_to_float(s[i]);
  }
}

#if PRMKERN_X86
PRMKERN_AVX2 void convert_f16_avx2(float* dst, const uint16_t* s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = f16_to_float(s[i]);
}
#endif

template <DType T, bool AVX>
PK_INLINE void convert_row(float* dst, const void* src, int64_t n) {
#if PRMKERN_X86
  if constexpr (AVX && T == DType::F16) {
    convert_f16_avx2(dst, static_cast<const uint16_t*>(src), n);
    return;
  }
#endif
  convert_row_scalar<T>(dst, src, n);
}

// Online-softmax state of nq queries: acc [nq, D] (unnormalised), running max m [nq], sum l [nq].
struct Keys {
  const void* k;
  const void* v;
  const int32_t* table;  // block ids
  int64_t len;           // tokens
};

// Online softmax over one chunk of scores s [nq, CHUNK] (C valid): p = exp(s - m_new) in place,
// alpha = exp(m_old - m_new), l = l * alpha + sum p, m = m_new.
PK_INLINE void softmax_chunk_body(float* s, int64_t nq, int64_t C, float* m, float* l, float* alpha) {
  for (int64_t i = 0; i < nq; ++i) {
    float* si = s + i * CHUNK;
    float cmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cmax)
    for (int64_t t = 0; t < C; ++t) cmax = std::max(cmax, si[t]);
    const float m_new = std::max(m[i], cmax);
    alpha[i] = exp_nonpos(m[i] - m_new);  // m[i] = -inf at first: ~0, and acc, l are 0 anyway
    float psum = 0.f;
#pragma omp simd reduction(+ : psum)
    for (int64_t t = 0; t < C; ++t) {
      si[t] = exp_nonpos(si[t] - m_new);
      psum += si[t];
    }
    l[i] = l[i] * alpha[i] + psum;
    m[i] = m_new;
  }
}

// Converts tokens c0 .. c0+C of `keys` to float32: K into kbuf [C, D] (and, when kt is given, transposed into
// kt [D, CHUNK] zero-padded past C), V into vbuf [C, D].
template <DType T, bool AVX>
PK_INLINE void load_chunk_body(const Keys& keys, int64_t c0, int64_t C, int64_t D, int64_t block_size, int64_t Hkv,
                               int64_t h, float* kbuf, float* vbuf, float* kt) {
  const int64_t esize = T == DType::F32 ? 4 : 2;
  for (int64_t t = 0; t < C; ++t) {
    const int64_t pos = c0 + t;
    const int64_t slot = static_cast<int64_t>(keys.table[pos / block_size]) * block_size + pos % block_size;
    const int64_t off = (slot * Hkv + h) * D * esize;
    convert_row<T, AVX>(kbuf + t * D, static_cast<const char*>(keys.k) + off, D);
    convert_row<T, AVX>(vbuf + t * D, static_cast<const char*>(keys.v) + off, D);
  }
  if (kt != nullptr) {
    for (int64_t d = 0; d < D; ++d) {
      float* row = kt + d * CHUNK;
      for (int64_t t = 0; t < C; ++t) row[t] = kbuf[t * D + d];
      for (int64_t t = C; t < CHUNK; ++t) row[t] = 0.f;
    }
  }
}

// The loops above compiled for AVX2 (OpenMP's outlined parallel regions do not inherit a caller's target, so the
// AVX2 code must live in functions of its own).
#if PRMKERN_X86
PRMKERN_AVX2 void softmax_chunk_avx2(float* s, int64_t nq, int64_t C, float* m, float* l, float* alpha) {
  softmax_chunk_body(s, nq, C, m, l, alpha);
}
template <DType T>
PRMKERN_AVX2 void load_chunk_avx2(const Keys& keys, int64_t c0, int64_t C, int64_t D, int64_t block_size,
                                  int64_t Hkv, int64_t h, float* kbuf, float* vbuf, float* kt) {
  load_chunk_body<T, true>(keys, c0, C, D, block_size, Hkv, h, kbuf, vbuf, kt);
}
#endif

template <bool AVX>
PK_INLINE void softmax_chunk(float* s, int64_t nq, int64_t C, float* m, float* l, float* alpha) {
#if PRMKERN_X86
  if constexpr (AVX) {
    softmax_chunk_avx2(s, nq, C, m, l, alpha);
    return;
  }
#endif
  softmax_chunk_body(s, nq, C, m, l, alpha);
}

template <DType T, bool AVX>
PK_INLINE void load_chunk(const Keys& keys, int64_t c0, int64_t C, int64_t D, int64_t block_size, int64_t Hkv,
                          int64_t h, float* kbuf, float* vbuf, float* kt) {
#if PRMKERN_X86
  if constexpr (AVX) {
    load_chunk_avx2<T>(keys, c0, C, D, block_size, Hkv, h, kbuf, vbuf, kt);
    return;
  }
#endif
  load_chunk_body<T, false>(keys, c0, C, D, block_size, Hkv, h, kbuf, vbuf, kt);
}

// Attends queries Q [nq, D] (already scaled) over `keys` of KV head h; updates acc/m/l.
// Scratch: kbuf [CHUNK, D] (K, then transposed into kt [D, CHUNK]), vbuf [CHUNK, D], s [nq, CHUNK], alpha [nq].
template <DType T, bool AVX>
PK_INLINE void attend(const float* Q, int64_t nq, int64_t D, const Keys& keys, int64_t block_size, int64_t Hkv,
                      int64_t h, float* acc, float* m, float* l, float* kbuf, float* kt, float* vbuf, float* s,
                      float* alpha) {
  const bool vec = AVX && D % 8 == 0;
  for (int64_t c0 = 0; c0 < keys.len; c0 += CHUNK) {
    const int64_t C = std::min<int64_t>(CHUNK, keys.len - c0);
    load_chunk<T, AVX>(keys, c0, C, D, block_size, Hkv, h, kbuf, vbuf, vec ? kt : nullptr);
    // scores s [nq, CHUNK]
#if PRMKERN_X86
    if (vec) {
      qk_avx2(Q, nq, D, kt, s);
    } else
#endif
    {
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t t = 0; t < C; ++t) {
          const float* qi = Q + i * D;
          const float* kr = kbuf + t * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * kr[d];
          s[i * CHUNK + t] = dot;
        }
    }
    softmax_chunk<AVX>(s, nq, C, m, l, alpha);
#if PRMKERN_X86
    if (vec) {
      pv_avx2(s, nq, C, vbuf, D, acc, alpha);
      continue;
    }
#endif
    for (int64_t i = 0; i < nq; ++i) {
      float* ai = acc + i * D;
      const float al = alpha[i];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ai[d] *= al;
      for (int64_t t = 0; t < C; ++t) {
        const float p = s[i * CHUNK + t];
        const float* vt = vbuf + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ai[d] += p * vt[d];
      }
    }
  }
}

template <DType T, bool AVX>
PK_INLINE void cascade_impl(const float* q, int64_t B, int64_t Hq, int64_t D, const void* k_cache,
                            const void* v_cache, int64_t block_size, int64_t Hkv, int64_t num_groups,
                            const int32_t* group_starts, const int32_t* prefix_lens, const int32_t* prefix_tables,
                            int64_t prefix_stride, const int32_t* suffix_lens, const int32_t* suffix_tables,
                            int64_t suffix_stride, float scale, float* out) {
  const int64_t G = Hq / Hkv;
  const float ninf = -std::numeric_limits<float>::infinity();
  // Prefix states per (chain, query head); m = -inf marks "no prefix".
  std::vector<float> p_acc(B * Hq * D), p_m(B * Hq, ninf), p_l(B * Hq, 0.f);
  int64_t max_group = 1;
  for (int64_t g = 0; g < num_groups; ++g) max_group = std::max<int64_t>(max_group, group_starts[g + 1] - group_starts[g]);

  // Prefix tasks: (group, KV head) with a shared prefix.
  std::vector<int64_t> tasks;
  for (int64_t g = 0; g < num_groups; ++g)
    if (prefix_lens[g] > 0)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back(g * Hkv + h);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel if (ntasks > 1)
  {
    std::vector<float> Q(max_group * G * D), acc(max_group * G * D), m(max_group * G), l(max_group * G);
    std::vector<float> kbuf(CHUNK * D), kt(CHUNK * D), vbuf(CHUNK * D), s(max_group * G * CHUNK),
        alpha(max_group * G);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < ntasks; ++ti) {
      const int64_t g = tasks[ti] / Hkv, h = tasks[ti] % Hkv;
      const int64_t r0 = group_starts[g], n = group_starts[g + 1] - r0, nq = n * G;
      for (int64_t b = 0; b < n; ++b)
        for (int64_t j = 0; j < G; ++j) {
          const float* src = q + ((r0 + b) * Hq + h * G + j) * D;
          float* dst = Q.data() + (b * G + j) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
        }
      std::fill(acc.begin(), acc.begin() + nq * D, 0.f);
      std::fill(m.begin(), m.begin() + nq, ninf);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      const Keys keys{k_cache, v_cache, prefix_tables + g * prefix_stride, prefix_lens[g]};
      attend<T, AVX>(Q.data(), nq, D, keys, block_size, Hkv, h, acc.data(), m.data(), l.data(), kbuf.data(),
                     kt.data(), vbuf.data(), s.data(), alpha.data());
      for (int64_t b = 0; b < n; ++b)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t row = (r0 + b) * Hq + h * G + j, i = b * G + j;
          std::copy(acc.data() + i * D, acc.data() + (i + 1) * D, p_acc.data() + row * D);
          p_m[row] = m[i];
          p_l[row] = l[i];
        }
    }
  }

  // Suffix tasks: (chain, KV head), merged with the chain's prefix state.
  const int64_t nsuffix = B * Hkv;
#pragma omp parallel if (nsuffix > 1)
  {
    std::vector<float> Q(G * D), acc(G * D), m(G), l(G), kbuf(CHUNK * D), kt(CHUNK * D), vbuf(CHUNK * D),
        s(G * CHUNK), alpha(G);
#pragma omp for schedule(dynamic, 4)
    for (int64_t ti = 0; ti < nsuffix; ++ti) {
      const int64_t b = ti / Hkv, h = ti % Hkv;
      for (int64_t j = 0; j < G; ++j) {
        const float* src = q + (b * Hq + h * G + j) * D;
        for (int64_t d = 0; d < D; ++d) Q[j * D + d] = src[d] * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), 0.f);
      const Keys keys{k_cache, v_cache, suffix_tables + b * suffix_stride, suffix_lens[b]};
      attend<T, AVX>(Q.data(), G, D, keys, block_size, Hkv, h, acc.data(), m.data(), l.data(), kbuf.data(),
                     kt.data(), vbuf.data(), s.data(), alpha.data());
      for (int64_t j = 0; j < G; ++j) {
        const int64_t row = b * Hq + h * G + j;
        const float ms = m[j], mp = p_m[row];
        const float mx = std::max(ms, mp);
        float* o = out + row * D;
        if (mx == ninf) {  // no key at all: the empty state (out = 0)
          std::fill(o, o + D, 0.f);
          continue;
        }
        const float ws = ms == ninf ? 0.f : std::exp(ms - mx), wp = mp == ninf ? 0.f : std::exp(mp - mx);
        const float inv = 1.f / (l[j] * ws + p_l[row] * wp);
        const float* pa = p_acc.data() + row * D;
        for (int64_t d = 0; d < D; ++d) o[d] = (acc[j * D + d] * ws + (wp != 0.f ? pa[d] * wp : 0.f)) * inv;
      }
    }
  }
}

template <bool AVX>
PK_INLINE void cascade_isa(DType ctype, const float* q, int64_t B, int64_t Hq, int64_t D, const void* k,
                           const void* v, int64_t bs, int64_t Hkv, int64_t ng, const int32_t* gs, const int32_t* pl,
                           const int32_t* pt, int64_t ps, const int32_t* sl, const int32_t* st, int64_t ss,
                           float scale, float* out) {
  switch (ctype) {
    case DType::F32: cascade_impl<DType::F32, AVX>(q, B, Hq, D, k, v, bs, Hkv, ng, gs, pl, pt, ps, sl, st, ss, scale, out); break;
    case DType::BF16: cascade_impl<DType::BF16, AVX>(q, B, Hq, D, k, v, bs, Hkv, ng, gs, pl, pt, ps, sl, st, ss, scale, out); break;
    case DType::F16: cascade_impl<DType::F16, AVX>(q, B, Hq, D, k, v, bs, Hkv, ng, gs, pl, pt, ps, sl, st, ss, scale, out); break;
  }
}

#if PRMKERN_X86
PRMKERN_AVX2 void cascade_avx2(DType ctype, const float* q, int64_t B, int64_t Hq, int64_t D, const void* k,
                               const void* v, int64_t bs, int64_t Hkv, int64_t ng, const int32_t* gs,
                               const int32_t* pl, const int32_t* pt, int64_t ps, const int32_t* sl,
                               const int32_t* st, int64_t ss, float scale, float* out) {
  cascade_isa<true>(ctype, q, B, Hq, D, k, v, bs, Hkv, ng, gs, pl, pt, ps, sl, st, ss, scale, out);
}
#endif

void cascade_scalar(DType ctype, const float* q, int64_t B, int64_t Hq, int64_t D, const void* k, const void* v,
                    int64_t bs, int64_t Hkv, int64_t ng, const int32_t* gs, const int32_t* pl, const int32_t* pt,
                    int64_t ps, const int32_t* sl, const int32_t* st, int64_t ss, float scale, float* out) {
  cascade_isa<false>(ctype, q, B, Hq, D, k, v, bs, Hkv, ng, gs, pl, pt, ps, sl, st, ss, scale, out);
}

}  // namespace

void cascade_decode(const float* q, int64_t B, int64_t Hq, int64_t D, const void* k_cache, const void* v_cache,
                    DType ctype, int64_t block_size, int64_t Hkv, int64_t num_groups, const int32_t* group_starts,
                    const int32_t* prefix_lens, const int32_t* prefix_tables, int64_t prefix_stride,
                    const int32_t* suffix_lens, const int32_t* suffix_tables, int64_t suffix_stride, float scale,
                    float* out) {
#if PRMKERN_X86
  if (cpu_has_avx2()) {
    cascade_avx2(ctype, q, B, Hq, D, k_cache, v_cache, block_size, Hkv, num_groups, group_starts, prefix_lens,
                 prefix_tables, prefix_stride, suffix_lens, suffix_tables, suffix_stride, scale, out);
    return;
  }
#endif
  cascade_scalar(ctype, q, B, Hq, D, k_cache, v_cache, block_size, Hkv, num_groups, group_starts, prefix_lens,
                 prefix_tables, prefix_stride, suffix_lens, suffix_tables, suffix_stride, scale, out);
}

}  // namespace prmkern
