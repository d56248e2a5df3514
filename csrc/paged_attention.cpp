// Cascade paged decode attention on the CPU, reading K/V in place from the block pool: the work split and merge.
//
// Each group's shared prefix is attended by all of its chains x GQA query heads of one KV head at once (a small
// GEMM pair, nq = n G queries against P keys; the register tiles are attention_tiles.h), so the prefix K/V is read
// from memory once per group and step, not once per chain. A prefix is cut into `splits` key ranges when there are
// too few (group, KV head) items to keep every thread busy (one group x 2 KV heads on 3 threads, 1 KV head on 2):
// each range leaves its own softmax state. Each chain's own suffix is then attended by its G query heads, and the
// suffix state and the group's prefix states are merged by log-sum-exp into the output. Only slots inside a
// sequence's length are read (never-written pool slots may hold anything, NaN included).
#include "paged_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "attention_vec.h"

namespace prmkern {
namespace {

// keys per chunk: S [CHUNK, nqp] and (bf16/fp16) K, V [CHUNK, D] stay in L1 / L2; 64 rather than 32 halves the
// per-chunk rescale of acc and the softmax epilogues (~2-5% at D = 64, paired runs), 96 gained nothing more
constexpr int CHUNK = 64;
constexpr int64_t MIN_SPLIT = 64;  // fewest prefix keys worth a split of their own (a split costs a Qt + a merge)
constexpr int MAX_W = 16;        // widest vector (AVX-512): buffers are sized for it, queries padded to W <= MAX_W
constexpr float LOG2E = 1.4426950408889634f;

struct AttnCtx {
  const float* q;  // [B, Hq, D] float32
  int64_t Hq, D, G, Hkv;
  const void* k_cache;  // [num_blocks, block_size, Hkv, D] of ctype
  const void* v_cache;
  DType ctype;
  int64_t block_size;
  float qscale;  // scale * log2(e): scores in log2 units, softmax by exp2
};

// Per-thread buffers of attention_tiles.h (sizes for the largest item: nqp_max = max group x G rounded to MAX_W).
struct Scratch {
  float* Qt;     // [D, nqp_max]
  float* S;      // [CHUNK, nqp_max]
  float* kbuf;   // [CHUNK, D] widened bf16 / fp16 rows
  float* vbuf;   // [CHUNK, D]
  float* alpha;  // [nqp_max]
  const float** krow;  // [CHUNK] row pointers of the chunk's keys and values
  const float** vrow;
};

}  // namespace
}  // namespace prmkern

// The tiles, compiled once per instruction set (see attention_tiles.h).
namespace prmkern {
namespace isa_scalar {
using V = VecScalar;
#include "attention_tiles.h"
}  // namespace isa_scalar
}  // namespace prmkern

#if PRMKERN_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace prmkern {
namespace isa_avx2 {
using V = Vec8;
#include "attention_tiles.h"
}  // namespace isa_avx2
}  // namespace prmkern
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif
namespace prmkern {
namespace isa_avx512 {
using V = Vec16;
#include "attention_tiles.h"
}  // namespace isa_avx512
}  // namespace prmkern
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace prmkern {
namespace {

using TaskFn = void (*)(const AttnCtx&, int64_t, int64_t, int64_t, const int32_t*, int64_t, int64_t, const Scratch&,
                        float*, float*, float*);
using CausalFn = void (*)(const AttnCtx&, int64_t, int64_t, int64_t, const int32_t*, int64_t, const Scratch&, float*,
                          float*, float*);
constexpr int64_t PREFILL_QUERIES = 64;  // queries per prefill tile (tokens x GQA heads of one KV head)

int64_t round_up(int64_t x, int64_t w) { return (x + w - 1) / w * w; }

// The path `isa` names ("" or nullptr: cpu_isa()), as that path's copy of a tile-level function.
template <typename Fn>
Fn by_isa(const char* isa, Fn scalar, Fn avx2, Fn avx512) {
  const std::string path = isa != nullptr && *isa ? isa : cpu_isa();
  return path == "avx512" ? avx512 : path == "avx2" ? avx2 : scalar;
}
#if PRMKERN_X86
#define ISA_FN(name) isa_avx2::name, isa_avx512::name
#else
#define ISA_FN(name) isa_scalar::name, isa_scalar::name
#endif

// Uninitialised float buffers on 64-byte (cache line) boundaries: every use writes before it reads (zeroing them
// was a visible share of a short call), and a 16-byte aligned vector buffer splits most AVX-512 loads and stores
// of the tiles over two cache lines.
struct FreeFloats {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuf = std::unique_ptr<float[], FreeFloats>;
FloatBuf alloc_floats(int64_t n) {
  float* p = static_cast<float*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * 4, 64)));
  if (p == nullptr) throw std::bad_alloc();  // as the std::vector it replaces would
  return FloatBuf(p);
}

// One thread's Scratch (attention_tiles.h) for items of up to nqp_max queries of head dim D, in one aligned buffer.
struct ThreadScratch {
  FloatBuf buf;
  std::vector<const float*> rows;
  Scratch s;
  ThreadScratch(int64_t D, int64_t nqp_max)
      : buf(alloc_floats(D * nqp_max + CHUNK * nqp_max + 2 * CHUNK * D + nqp_max)), rows(2 * CHUNK) {
    float* const b = buf.get();
    s = Scratch{b, b + D * nqp_max, b + (D + CHUNK) * nqp_max, b + (D + CHUNK) * nqp_max + CHUNK * D,
                b + (D + CHUNK) * nqp_max + 2 * CHUNK * D, rows.data(), rows.data() + CHUNK};
  }
};

// A prefix work item: group g, KV head h, prefix keys [k0, k1); its state lives at acc_off (n G x D floats) and
// ml_off (nqp floats each for m and l).
struct PrefixItem {
  int64_t g, h, k0, k1, acc_off, ml_off, cost;
};

}  // namespace

void cascade_decode(const float* q, int64_t B, int64_t Hq, int64_t D, const void* k_cache, const void* v_cache,
                    DType ctype, int64_t block_size, int64_t Hkv, int64_t num_groups, const int32_t* group_starts,
                    const int32_t* prefix_lens, const int32_t* prefix_tables, int64_t prefix_stride,
                    const int32_t* suffix_lens, const int32_t* suffix_tables, int64_t suffix_stride, float scale,
                    float* out, const char* isa) {
  const TaskFn task = by_isa<TaskFn>(isa, isa_scalar::attend_task, ISA_FN(attend_task));
  const int64_t G = Hq / Hkv;
  const AttnCtx c{q, Hq, D, G, Hkv, k_cache, v_cache, ctype, block_size, scale * LOG2E};
  const float ninf = -std::numeric_limits<float>::infinity();

  // Prefix items, each (group, KV head) cut into `splits` key ranges so that the item count fills the threads.
  const int64_t threads = omp_get_max_threads();
  int64_t base = 0, max_group = 1;
  for (int64_t g = 0; g < num_groups; ++g) {
    base += prefix_lens[g] > 0 ? Hkv : 0;
    max_group = std::max<int64_t>(max_group, group_starts[g + 1] - group_starts[g]);
  }
  int64_t splits = 1;
  if (threads > 1 && base > 0)
    while ((base * splits) % threads != 0 && base * splits < 4 * threads) ++splits;
  std::vector<PrefixItem> items;
  std::vector<int64_t> first_item(num_groups * Hkv + 1, 0), row_group(B, 0);
  int64_t acc_size = 0, ml_size = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t plen = prefix_lens[g], n = group_starts[g + 1] - group_starts[g];
    for (int64_t b = group_starts[g]; b < group_starts[g + 1]; ++b) row_group[b] = g;
    const int64_t s = plen > 0 ? std::max<int64_t>(1, std::min<int64_t>(splits, plen / MIN_SPLIT)) : 0;
    for (int64_t h = 0; h < Hkv; ++h) {
      first_item[g * Hkv + h] = static_cast<int64_t>(items.size());
      for (int64_t i = 0; i < s; ++i) {
        // split points on chunk boundaries where the length allows
        const int64_t k0 = i == 0 ? 0 : std::min(plen, round_up(plen * i / s, CHUNK));
        const int64_t k1 = i == s - 1 ? plen : std::min(plen, round_up(plen * (i + 1) / s, CHUNK));
        items.push_back({g, h, k0, k1, acc_size, ml_size, (k1 - k0) * n});
        acc_size += n * G * D;
        ml_size += round_up(n * G, MAX_W);
      }
    }
  }
  first_item[num_groups * Hkv] = static_cast<int64_t>(items.size());
  std::vector<int64_t> order(items.size());  // largest first, for the dynamic schedule
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });
  // the prefix states, written whole by their items before the merge reads them
  const FloatBuf st_acc = alloc_floats(acc_size), st_m = alloc_floats(ml_size), st_l = alloc_floats(ml_size);

  const int64_t nitems = static_cast<int64_t>(items.size()), nsuffix = B * Hkv;
  const int64_t nqp_max = round_up(max_group * G, MAX_W);
#pragma omp parallel if (nitems + nsuffix > 1)
  {
    const ThreadScratch ts(D, nqp_max);
    const Scratch& s = ts.s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t oi = 0; oi < nitems; ++oi) {
      const PrefixItem& it = items[order[oi]];
      const int64_t r0 = group_starts[it.g], n = group_starts[it.g + 1] - r0;
      task(c, r0, n, it.h, prefix_tables + it.g * prefix_stride, it.k0, it.k1, s, st_acc.get() + it.acc_off,
           st_m.get() + it.ml_off, st_l.get() + it.ml_off);
    }
    // (implicit barrier: every prefix state is written)
    const FloatBuf acc = alloc_floats(G * D), m = alloc_floats(round_up(G, MAX_W));
    const FloatBuf l = alloc_floats(round_up(G, MAX_W));
#pragma omp for schedule(dynamic, 4)
    for (int64_t ti = 0; ti < nsuffix; ++ti) {
      const int64_t b = ti / Hkv, h = ti % Hkv, g = row_group[b], local = b - group_starts[g];
      task(c, b, 1, h, suffix_tables + b * suffix_stride, 0, suffix_lens[b], s, acc.get(), m.get(), l.get());
      const int64_t i0 = first_item[g * Hkv + h], i1 = first_item[g * Hkv + h + 1];
      for (int64_t j = 0; j < G; ++j) {
        const int64_t qi = local * G + j;  // this query's row in the group's prefix states
        float mx = m[j];
        for (int64_t i = i0; i < i1; ++i) mx = std::max(mx, st_m[items[i].ml_off + qi]);
        float* o = out + (b * Hq + h * G + j) * D;
        if (mx == ninf) {  // no key at all: the empty state (out = 0)
          std::fill(o, o + D, 0.f);
          continue;
        }
        const float ws = m[j] == ninf ? 0.f : std::exp2(m[j] - mx);
        float total = l[j] * ws;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[j * D + d] * ws;
        for (int64_t i = i0; i < i1; ++i) {
          const float mi = st_m[items[i].ml_off + qi];
          if (mi == ninf) continue;
          const float wi = std::exp2(mi - mx);
          total += st_l[items[i].ml_off + qi] * wi;
          const float* pa = st_acc.get() + items[i].acc_off + qi * D;
          for (int64_t d = 0; d < D; ++d) o[d] += pa[d] * wi;
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  }
}

void prefill_attention(const float* q, int64_t T, int64_t Hq, int64_t D, const void* k_cache, const void* v_cache,
                       DType ctype, int64_t block_size, int64_t Hkv, int64_t num_seqs, const int32_t* cu_seqlens_q,
                       const int32_t* seq_lens, const int32_t* block_tables, int64_t table_stride, float scale,
                       float* out, const char* isa) {
  const CausalFn task = by_isa<CausalFn>(isa, isa_scalar::attend_causal, ISA_FN(attend_causal));
  const int64_t G = Hq / Hkv;
  const AttnCtx c{q, Hq, D, G, Hkv, k_cache, v_cache, ctype, block_size, scale * LOG2E};
  // Tiles of BT tokens x G heads (~64 queries, the decode cascade's shape at 16 chains), one item per (sequence,
  // KV head, tile); causal rows differ in cost (keys up to the tile's end), so the largest go first.
  const int64_t BT = std::max<int64_t>(1, PREFILL_QUERIES / G);
  struct Item {
    int64_t r0, n, h, seq, q0;
  };
  std::vector<Item> items;
  for (int64_t sq = 0; sq < num_seqs; ++sq) {
    const int64_t b0 = cu_seqlens_q[sq], qlen = cu_seqlens_q[sq + 1] - b0, first_pos = seq_lens[sq] - qlen;
    for (int64_t t0 = 0; t0 < qlen; t0 += BT)
      for (int64_t h = 0; h < Hkv; ++h) items.push_back({b0 + t0, std::min(BT, qlen - t0), h, sq, first_pos + t0});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.q0 + a.n > b.q0 + b.n; });
  const int64_t nitems = static_cast<int64_t>(items.size()), nqp_max = round_up(BT * G, MAX_W);
#pragma omp parallel if (nitems > 1)
  {
    const ThreadScratch ts(D, nqp_max);
    const FloatBuf acc = alloc_floats(BT * G * D), m = alloc_floats(nqp_max), l = alloc_floats(nqp_max);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ii = 0; ii < nitems; ++ii) {
      const Item& it = items[ii];
      task(c, it.r0, it.n, it.h, block_tables + it.seq * table_stride, it.q0, ts.s, acc.get(), m.get(), l.get());
      for (int64_t i = 0; i < it.n * G; ++i) {  // query i: token r0 + i / G, head h G + i % G; l > 0 (key 0)
        float* o = out + ((it.r0 + i / G) * Hq + it.h * G + i % G) * D;
        const float inv = 1.f / l[i];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv;
      }
    }
  }
}

}  // namespace prmkern
