// The register tiles of the cascade decode attention (csrc/paged_attention.cpp), written once against a vector type
// `V` (attention_vec.h) and compiled once per instruction set: paged_attention.cpp includes this file several
// times (no include guard on purpose), each time inside its own namespace, with `V` aliased to VecScalar, Vec8 or
// Vec16 and, for the vector ones, inside a matching target region.
//
// One call of attend_keys() is a small GEMM pair: nq queries (a group's chains x GQA heads of one KV head) against
// keys [k0, k1) of one block table, online softmax, P @ V. Layouts, chosen so that nothing is transposed per key:
//   Qt  [D, nqp]     the queries transposed once per task, pre-scaled by scale * log2(e); nqp = nq rounded up to W
//                    (padding queries are zero: finite scores, ignored)
//   S   [C, nqp]     scores then probabilities of one chunk of C <= CHUNK keys, query-contiguous, so that the
//                    scores tile (W-query vectors x keys, each K element broadcast from its cache row), the softmax
//                    (running max / sum per query lane) and the P @ V tile need no horizontal reduction
//   acc [nq, D]      unnormalised output, m / l [nqp] running max (log2 units) and sum
// K and V rows are read in place from the pool for fp32 caches; bf16 / fp16 rows are widened once per chunk.

// S[t, q] = sum_d K[t, d] Qt[d, q] for NQV query vectors x NK keys, accumulated in NQV * NK registers.
template <int NQV, int NK>
PK_INLINE void qk_tile(const float* Qt, int64_t nqp, int64_t D, const float* const* K, int64_t t, int64_t q0,
                       float* S) {
  typename V::T a[NK][NQV];
  for (int k = 0; k < NK; ++k)
    for (int j = 0; j < NQV; ++j) a[k][j] = V::zero();
  const float* kr[NK];
  for (int k = 0; k < NK; ++k) kr[k] = K[t + k];
  for (int64_t d = 0; d < D; ++d) {
    typename V::T qv[NQV];
    for (int j = 0; j < NQV; ++j) qv[j] = V::load(Qt + d * nqp + q0 + j * V::W);
    for (int k = 0; k < NK; ++k) {
      const typename V::T kb = V::set1(kr[k][d]);
      for (int j = 0; j < NQV; ++j) a[k][j] = V::fma(qv[j], kb, a[k][j]);
    }
  }
  for (int k = 0; k < NK; ++k)
    for (int j = 0; j < NQV; ++j) V::store(S + (t + k) * nqp + q0 + j * V::W, a[k][j]);
}

template <int NQV>
PK_INLINE void qk_cols(const float* Qt, int64_t nqp, int64_t D, const float* const* K, int64_t C, int64_t q0,
                       float* S) {
  constexpr int NK = V::W == 16 ? 6 : 4;  // AVX-512: 2 x 6 of 32 registers; AVX2: 3 x 4 of 16
  int64_t t = 0;
  for (; t + NK <= C; t += NK) qk_tile<NQV, NK>(Qt, nqp, D, K, t, q0, S);
  // The last C % NK keys as one tile: key by key, each tile would be one FMA chain per register, latency-bound.
  switch (C - t) {
    case 5: qk_tile<NQV, 5>(Qt, nqp, D, K, t, q0, S); break;
    case 4: qk_tile<NQV, 4>(Qt, nqp, D, K, t, q0, S); break;
    case 3: qk_tile<NQV, 3>(Qt, nqp, D, K, t, q0, S); break;
    case 2: qk_tile<NQV, 2>(Qt, nqp, D, K, t, q0, S); break;
    case 1: qk_tile<NQV, 1>(Qt, nqp, D, K, t, q0, S); break;
    default: break;
  }
}

PK_INLINE void qk(const float* Qt, int64_t nqp, int64_t D, const float* const* K, int64_t C, float* S) {
  constexpr int NQV = V::W == 16 ? 2 : 3;
  constexpr int64_t step = NQV * V::W;
  int64_t q0 = 0;
  for (; q0 + step <= nqp; q0 += step) qk_cols<NQV>(Qt, nqp, D, K, C, q0, S);
  for (; q0 + 2 * V::W <= nqp; q0 += 2 * V::W) qk_cols<2>(Qt, nqp, D, K, C, q0, S);
  for (; q0 < nqp; q0 += V::W) qk_cols<1>(Qt, nqp, D, K, C, q0, S);
}

// Few queries (a chain's own suffix: nq = G): in the [C, nqp] tiles above most lanes would be padding queries
// (3 / 4 of them at G = 4, W = 16), so each score is a dot product over D instead, the queries kept as rows
// Q [nq, D]. A tile holds NQ queries x NT = W / NQ keys, one register per pair summed along D, and V::lane_sums
// turns the W registers into one vector of W scores. Needs D % W == 0 (dots_fit()).
PK_INLINE bool dots_fit(int64_t nq, int64_t D) { return 2 * nq <= V::W && D % V::W == 0; }

template <int NQ>
PK_INLINE void qk_dot_tile(const float* Q, int64_t D, const float* const* K, int64_t t, int64_t nt, int64_t q0,
                           int64_t nqp, float* S) {
  constexpr int NT = V::W / NQ;
  typename V::T a[V::W];  // pair (key k, query r) in a[k NQ + r]
  for (int p = 0; p < V::W; ++p) a[p] = V::zero();
  const float* kr[NT];
  for (int k = 0; k < NT; ++k) kr[k] = K[t + std::min<int64_t>(k, nt - 1)];  // keys past nt: computed, dropped
  for (int64_t d = 0; d < D; d += V::W) {
    typename V::T kv[NT];
    for (int k = 0; k < NT; ++k) kv[k] = V::load(kr[k] + d);
    for (int r = 0; r < NQ; ++r) {
      const typename V::T qv = V::load(Q + (q0 + r) * D + d);
      for (int k = 0; k < NT; ++k) a[k * NQ + r] = V::fma(qv, kv[k], a[k * NQ + r]);
    }
  }
  float o[V::W];
  V::store(o, V::lane_sums(a));
  for (int64_t k = 0; k < nt; ++k)
    for (int r = 0; r < NQ; ++r) S[(t + k) * nqp + q0 + r] = o[k * NQ + r];
}

template <int NQ>
PK_INLINE void qk_dot_rows(const float* Q, int64_t D, const float* const* K, int64_t C, int64_t q0, int64_t nqp,
                           float* S) {
  constexpr int NT = V::W / NQ;
  for (int64_t t = 0; t < C; t += NT) qk_dot_tile<NQ>(Q, D, K, t, std::min<int64_t>(NT, C - t), q0, nqp, S);
}

PK_INLINE void qk_dots(const float* Q, int64_t nq, int64_t nqp, int64_t D, const float* const* K, int64_t C,
                       float* S) {
  int64_t q0 = 0;
  for (; q0 + 4 <= nq; q0 += 4) qk_dot_rows<4>(Q, D, K, C, q0, nqp, S);
  for (; q0 + 2 <= nq; q0 += 2) qk_dot_rows<2>(Q, D, K, C, q0, nqp, S);
  for (; q0 < nq; ++q0) qk_dot_rows<1>(Q, D, K, C, q0, nqp, S);
}

// Online softmax over one chunk, every query lane at once: m_new = max(m, max_t S), alpha = 2^(m - m_new),
// S = 2^(S - m_new) in place, l = l * alpha + sum_t S, m = m_new.
PK_INLINE void softmax(float* S, int64_t nqp, int64_t C, float* m, float* l, float* alpha) {
  for (int64_t q0 = 0; q0 < nqp; q0 += V::W) {
    typename V::T mx = V::load(S + q0);
    for (int64_t t = 1; t < C; ++t) mx = V::max(mx, V::load(S + t * nqp + q0));
    const typename V::T mo = V::load(m + q0);
    const typename V::T mn = V::max(mo, mx);
    const typename V::T al = V::exp2(V::sub(mo, mn));
    typename V::T sum = V::zero();
    for (int64_t t = 0; t < C; ++t) {
      const typename V::T p = V::exp2(V::sub(V::load(S + t * nqp + q0), mn));
      V::store(S + t * nqp + q0, p);
      sum = V::add(sum, p);
    }
    V::store(l + q0, V::fma(V::load(l + q0), al, sum));
    V::store(m + q0, mn);
    V::store(alpha + q0, al);
  }
}

// acc[i + r, d0 : d0 + NDV W] = acc * alpha[i + r] + sum_t S[t, i + r] V[t, d0 : ...] for NQ queries.
template <int NQ, int NDV>
PK_INLINE void pv_tile(const float* S, int64_t nqp, int64_t C, const float* const* Vr, int64_t D, float* acc,
                       const float* alpha, int64_t i, int64_t d0) {
  typename V::T a[NQ][NDV];
  for (int r = 0; r < NQ; ++r) {
    const typename V::T al = V::set1(alpha[i + r]);
    for (int v = 0; v < NDV; ++v) a[r][v] = V::mul(V::load(acc + (i + r) * D + d0 + v * V::W), al);
  }
  for (int64_t t = 0; t < C; ++t) {
    typename V::T p[NQ];
    for (int r = 0; r < NQ; ++r) p[r] = V::set1(S[t * nqp + i + r]);
    for (int v = 0; v < NDV; ++v) {
      const typename V::T vv = V::load(Vr[t] + d0 + v * V::W);
      for (int r = 0; r < NQ; ++r) a[r][v] = V::fma(p[r], vv, a[r][v]);
    }
  }
  for (int r = 0; r < NQ; ++r)
    for (int v = 0; v < NDV; ++v) V::store(acc + (i + r) * D + d0 + v * V::W, a[r][v]);
}

template <int NQ>
PK_INLINE void pv_rows(const float* S, int64_t nqp, int64_t C, const float* const* Vr, int64_t D, float* acc,
                       const float* alpha, int64_t i) {
  int64_t d0 = 0;
  for (; d0 + 4 * V::W <= D; d0 += 4 * V::W) pv_tile<NQ, 4>(S, nqp, C, Vr, D, acc, alpha, i, d0);
  for (; d0 + V::W <= D; d0 += V::W) pv_tile<NQ, 1>(S, nqp, C, Vr, D, acc, alpha, i, d0);
  for (int r = 0; r < NQ; ++r)  // head dims past the last full vector
    for (int64_t d = d0; d < D; ++d) {
      float x = acc[(i + r) * D + d] * alpha[i + r];
      for (int64_t t = 0; t < C; ++t) x += S[t * nqp + i + r] * Vr[t][d];
      acc[(i + r) * D + d] = x;
    }
}

PK_INLINE void pv(const float* S, int64_t nqp, int64_t nq, int64_t C, const float* const* Vr, int64_t D,
                  float* acc, const float* alpha) {
  constexpr int NQ = V::W == 16 ? 4 : 3;  // AVX-512: 4 x 4 vectors of 32 registers; AVX2: 3 x 4 of 16
  int64_t i = 0;
  for (; i + NQ <= nq; i += NQ) pv_rows<NQ>(S, nqp, C, Vr, D, acc, alpha, i);
  for (; i + 2 <= nq; i += 2) pv_rows<2>(S, nqp, C, Vr, D, acc, alpha, i);
  for (; i < nq; ++i) pv_rows<1>(S, nqp, C, Vr, D, acc, alpha, i);
}

// Prefill's causal mask on one chunk of scores S [C, nqp] for keys c0 .. c0+C: query i (token i / G of a tile whose
// first token sits at position q0) sees keys at positions <= q0 + i / G; the others get -inf (weight 0).
PK_INLINE void mask_future(float* S, int64_t nqp, int64_t nq, int64_t C, int64_t c0, int64_t q0, int64_t G) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < C; ++t) {
    const int64_t first = std::min<int64_t>(nq, (c0 + t - q0) * G);  // the first query that sees key c0 + t
    for (int64_t i = 0; i < first; ++i) S[t * nqp + i] = ninf;
  }
}

// Attends Qt (nq queries, see above) over keys [k0, k1) of KV head h in `table`, updating acc / m / l; `dots`: Qt
// holds query rows for qk_dots. causal_q0 >= 0: prefill's diagonal, each query sees only the keys up to its own
// position (mask_future).
template <DType T>
void attend_keys(const AttnCtx& c, const float* Qt, int64_t nq, int64_t nqp, int64_t h, const int32_t* table,
                 int64_t k0, int64_t k1, const Scratch& s, float* acc, float* m, float* l, bool dots,
                 int64_t causal_q0 = -1) {
  const int64_t D = c.D, bs = c.block_size;
  constexpr int64_t ES = T == DType::F32 ? 4 : 2;
  const int64_t row_bytes = D * ES;
  // The pool is read from memory (a decode step streams far more weight bytes than the caches hold), one KV head's
  // row of each token at a time: request the next chunk's K and V rows while this chunk is computed, or every
  // chunk would wait on memory latency (measured in the engine: 2x the time of the same call on cached K/V).
  auto prefetch_chunk = [&](int64_t p0) {
    const int64_t p1 = std::min<int64_t>(k1, p0 + CHUNK);
    for (int64_t pos = p0; pos < p1; ++pos) {
      const int64_t off = ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * c.Hkv + h) * row_bytes;
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(static_cast<const char*>(c.k_cache) + off + b, 0, 2);
        __builtin_prefetch(static_cast<const char*>(c.v_cache) + off + b, 0, 2);
      }
    }
  };
  prefetch_chunk(k0);
  for (int64_t c0 = k0; c0 < k1; c0 += CHUNK) {
    const int64_t C = std::min<int64_t>(CHUNK, k1 - c0);
    if (c0 + CHUNK < k1) prefetch_chunk(c0 + CHUNK);
    for (int64_t t = 0; t < C; ++t) {
      const int64_t pos = c0 + t;
      const int64_t off = ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * c.Hkv + h) * D;
      if constexpr (T == DType::F32) {
        s.krow[t] = static_cast<const float*>(c.k_cache) + off;
        s.vrow[t] = static_cast<const float*>(c.v_cache) + off;
      } else {
        V::convert(s.kbuf + t * D, static_cast<const uint16_t*>(c.k_cache) + off, D, T == DType::BF16);
        V::convert(s.vbuf + t * D, static_cast<const uint16_t*>(c.v_cache) + off, D, T == DType::BF16);
        s.krow[t] = s.kbuf + t * D;
        s.vrow[t] = s.vbuf + t * D;
      }
    }
    if (dots)
      qk_dots(Qt, nq, nqp, D, s.krow, C, s.S);
    else
      qk(Qt, nqp, D, s.krow, C, s.S);
    if (causal_q0 >= 0) mask_future(s.S, nqp, nq, C, c0, causal_q0, c.G);
    softmax(s.S, nqp, C, m, l, s.alpha);
    pv(s.S, nqp, nq, C, s.vrow, D, acc, s.alpha);
  }
}

// attend_keys for the cache's dtype (c.ctype).
void attend_keys_any(const AttnCtx& c, const float* Qt, int64_t nq, int64_t nqp, int64_t h, const int32_t* table,
                     int64_t k0, int64_t k1, const Scratch& s, float* acc, float* m, float* l, bool dots,
                     int64_t causal_q0 = -1) {
  switch (c.ctype) {
    case DType::F32: return attend_keys<DType::F32>(c, Qt, nq, nqp, h, table, k0, k1, s, acc, m, l, dots, causal_q0);
    case DType::BF16: return attend_keys<DType::BF16>(c, Qt, nq, nqp, h, table, k0, k1, s, acc, m, l, dots, causal_q0);
    case DType::F16: return attend_keys<DType::F16>(c, Qt, nq, nqp, h, table, k0, k1, s, acc, m, l, dots, causal_q0);
  }
}

// One work item: the queries of chains r0 .. r0+n x the G query heads of KV head h, over keys [k0, k1) of `table`.
// Leaves the unnormalised state in acc [n G, D], m / l [nqp] (m in log2 units; -inf and 0 for no key). dots_ok:
// scores of few queries may be dot products (qk_dots) rather than query-vector tiles (another summation order).
void attend_task_with(const AttnCtx& c, int64_t r0, int64_t n, int64_t h, const int32_t* table, int64_t k0,
                      int64_t k1, const Scratch& s, float* acc, float* m, float* l, bool dots_ok) {
  const int64_t D = c.D, G = c.G, nq = n * G, nqp = (nq + V::W - 1) / V::W * V::W;
  const bool dots = dots_ok && dots_fit(nq, D);
  if (dots) {  // rows Q [nq, D] for qk_dots, in the Qt buffer
    for (int64_t i = 0; i < nq; ++i) {
      const float* src = c.q + ((r0 + i / G) * c.Hq + h * G + i % G) * D;
      for (int64_t d = 0; d < D; ++d) s.Qt[i * D + d] = src[d] * c.qscale;
    }
  } else {  // Qt [D, nqp]: zero each row's last vector (it holds the padding queries), then the queries over it
    for (int64_t d = 0; d < D; ++d) V::store(s.Qt + d * nqp + nqp - V::W, V::zero());
    for (int64_t i = 0; i < nq; ++i) {
      const float* src = c.q + ((r0 + i / G) * c.Hq + h * G + i % G) * D;
      for (int64_t d = 0; d < D; ++d) s.Qt[d * nqp + i] = src[d] * c.qscale;
    }
  }
  std::fill(acc, acc + nq * D, 0.f);
  std::fill(m, m + nqp, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nqp, 0.f);
  attend_keys_any(c, s.Qt, nq, nqp, h, table, k0, k1, s, acc, m, l, dots);
}

void attend_task(const AttnCtx& c, int64_t r0, int64_t n, int64_t h, const int32_t* table, int64_t k0, int64_t k1,
                 const Scratch& s, float* acc, float* m, float* l) {
  attend_task_with(c, r0, n, h, table, k0, k1, s, acc, m, l, true);
}

// Prefill: tokens r0 .. r0+n of one sequence (rows of q; token j at position q0 + j) x the G query heads of KV head
// h, causally: the whole key chunks every query sees (up to the last CHUNK boundary <= q0 + 1) in one unmasked pass,
// the rest up to q0 + n - 1 with each query's future keys masked. Chunks sit on multiples of CHUNK from key 0 and
// the scores are always query-vector tiles, so a token's output does not depend on the tile it falls in: a prompt
// prefilled whole or after a cached prefix gives the same floats (a data-parallel job writes the bytes one process
// writes). A fully masked chunk leaves a query's state exactly as it was (alpha = 2^0, weights 0). Leaves the
// unnormalised state like attend_task.
void attend_causal(const AttnCtx& c, int64_t r0, int64_t n, int64_t h, const int32_t* table, int64_t q0,
                   const Scratch& s, float* acc, float* m, float* l) {
  const int64_t seen = (q0 + 1) / CHUNK * CHUNK;  // keys [0, seen): whole chunks every query of the tile sees
  attend_task_with(c, r0, n, h, table, 0, seen, s, acc, m, l, false);
  const int64_t nq = n * c.G, nqp = (nq + V::W - 1) / V::W * V::W;
  // s.Qt still holds these queries (attend_task_with built it)
  attend_keys_any(c, s.Qt, nq, nqp, h, table, seen, q0 + n, s, acc, m, l, false, q0);
}
