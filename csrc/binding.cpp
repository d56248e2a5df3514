// The torch binding of the CPU kernels (module prmkern._C): checks shapes, dtypes and strides, converts the few
// activation rows to float32 and back, and calls the plain C++ kernels (which include no torch header, so they
// compile in seconds). Errors say what was given and what is accepted.
#include <torch/extension.h>

#include "cpu_features.h"
#include "decode_gemm.h"
#include "elementwise.h"
#include "paged_attention.h"
#include "panel_gemm.h"
#include "peak.h"
#include "prefill_gemm.h"
#include "rotary_store.h"
#include "sampling.h"

namespace {

prmkern::DType kernel_dtype(const torch::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return prmkern::DType::F32;
    case torch::kBFloat16: return prmkern::DType::BF16;
    case torch::kFloat16: return prmkern::DType::F16;
    default:
      TORCH_CHECK(false, what, " has dtype ", t.scalar_type(), "; accepted: float32, bfloat16, float16");
  }
}

// panels, when given, must be weight's copy in column panels [ceil(N/48), K, 48], or for a bf16 weight in pair
// panels [ceil(N/48), ceil(K/2), 48, 2] (prmkern/models/decode_panels.py).
void check_panels(const torch::Tensor& panels, const torch::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + prmkern::kPanelCols - 1) / prmkern::kPanelCols;
  const bool pairs = panels.dim() == 4;
  const bool shape_ok = pairs ? panels.size(0) == P && panels.size(1) == (K + 1) / 2 &&
                                    panels.size(2) == prmkern::kPanelCols && panels.size(3) == 2
                              : panels.dim() == 3 && panels.size(0) == P && panels.size(1) == K &&
                                    panels.size(2) == prmkern::kPanelCols;
  TORCH_CHECK(panels.device().is_cpu() && shape_ok && panels.is_contiguous() &&
                  panels.scalar_type() == weight.scalar_type() && (!pairs || weight.scalar_type() == torch::kBFloat16),
              "decode_linear: panels must be a contiguous CPU tensor [", P, ", ", K, ", ", prmkern::kPanelCols,
              "] (pack_panels) or, for a bf16 weight, [", P, ", ", (K + 1) / 2, ", ", prmkern::kPanelCols,
              ", 2] (pack_pair_panels), of the weight's dtype ", weight.scalar_type(), " (the weight is [", N, ", ", K,
              "]); got ", panels.scalar_type(), " ", panels.sizes(), panels.is_contiguous() ? "" : " (not contiguous)");
}

// x [M, K] (any float dtype) @ weight [N, K]^T + bias [N] -> [M, N] in x's dtype. weight rows must be contiguous
// (stride(1) == 1), the checkpoint's layout. With `panels` (the weight in column panels, or bf16 pair panels with
// bf16 x on an AVX-512 BF16 CPU) the panel GEMM reads them instead of the weight.
torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& panels) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "decode_linear: x must be [M, K] and weight [N, K]; got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "decode_linear: x has K=", x.size(1), " but weight has K=", weight.size(1));
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1, "decode_linear: weight rows must be contiguous (stride(1) == 1); got strides ",
              weight.strides());
  const auto wtype = kernel_dtype(weight, "weight");
  kernel_dtype(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "decode_linear: bias must be [", N, "]; got ", bias->sizes());
    bf = bias->to(torch::kFloat32).contiguous();
  }
  const bool use_panels = panels.has_value() && panels->defined();
  if (use_panels) check_panels(*panels, weight);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const float* bptr = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (M > 0 && N > 0 && use_panels && panels->dim() == 4) {
    // bf16 pair panels: AVX-512 BF16 dot products on bf16 x; otherwise (fp32 x, a CPU without them) the weight's
    // own paths below
    if (x.scalar_type() == torch::kBFloat16) {
      auto xb = x.contiguous();
      if (prmkern::panel_gemm_bf16_dot(reinterpret_cast<const uint16_t*>(xb.data_ptr()), M, K,
                                       reinterpret_cast<const uint16_t*>(panels->data_ptr()), N, bptr,
                                       y.data_ptr<float>(), N))
        return y.to(x.scalar_type());
    }
  } else if (M > 0 && N > 0 && use_panels) {
    auto xf = x.to(torch::kFloat32).contiguous();
    prmkern::panel_gemm(xf.data_ptr<float>(), M, K, panels->data_ptr(), wtype, N, bptr, y.data_ptr<float>(), N);
    return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
  }
  if (M > 0 && N > 0 && wtype == prmkern::DType::BF16 && x.scalar_type() == torch::kBFloat16) {
    // bf16 x bf16: AVX-512 BF16 dot products where the CPU has them (x used as it is), else x widened in C++
    auto xb = x.contiguous();
    prmkern::decode_gemm_bf16_dot(reinterpret_cast<const uint16_t*>(xb.data_ptr()), M, K,
                                  reinterpret_cast<const uint16_t*>(weight.data_ptr()), N,
                                  std::max<int64_t>(weight.stride(0), K), bptr, y.data_ptr<float>(), N);
  } else if (M > 0 && N > 0) {
    auto xf = x.to(torch::kFloat32).contiguous();
    prmkern::decode_gemm(xf.data_ptr<float>(), M, K, weight.data_ptr(), wtype, N, std::max<int64_t>(weight.stride(0), K),
                         bptr, y.data_ptr<float>(), N);
  }
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

torch::Tensor int32_table(const torch::Tensor& t, const char* what, int64_t dims) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.dim() == dims && t.device().is_cpu(), what,
              " must be a CPU int32 tensor of ", dims, " dims; got ", t.scalar_type(), " ", t.sizes());
  return t.contiguous();
}

// Every block that row r's length lens[r] covers must be a pool block: a bad table fails here, not as a wild read.
void check_table_rows(const torch::Tensor& table, const torch::Tensor& lens, int64_t block_size, int64_t num_blocks,
                      const char* op, const char* what) {
  const int32_t* t = table.data_ptr<int32_t>();
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < lens.size(0); ++r) {
    const int64_t need = (static_cast<int64_t>(l[r]) + block_size - 1) / block_size;
    TORCH_CHECK(l[r] >= 0 && need <= table.size(1), op, ": ", what, " row ", r, " has length ", l[r],
                " but its table holds ", table.size(1), " blocks of ", block_size);
    for (int64_t j = 0; j < need; ++j)
      TORCH_CHECK(t[r * table.size(1) + j] >= 0 && t[r * table.size(1) + j] < num_blocks, op, ": ", what, " row ",
                  r, " names block ", t[r * table.size(1) + j], " of a pool of ", num_blocks);
  }
}

// An attention op's `isa` argument: '' (this CPU's widest path) or a path this CPU (and PRMKERN_ISA) allows.
void check_isa(const std::string& isa, const char* op) {
  const std::string have = prmkern::cpu_isa();
  const bool ok = isa.empty() || isa == "scalar" || (isa == "avx2" && have != "scalar") ||
                  (isa == "avx512" && have == "avx512");
  TORCH_CHECK(ok, op, ": isa='", isa, "' is not available; this CPU (and PRMKERN_ISA) allows up to '", have,
              "' (accepted: '', 'scalar', 'avx2', 'avx512')");
}

// q [B, Hq, D] -> out [B, Hq, D] in q's dtype; caches [num_blocks, block_size, Hkv, D]; see paged_attention.h.
torch::Tensor cascade_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                             const torch::Tensor& group_starts, const torch::Tensor& prefix_lens,
                             const torch::Tensor& prefix_tables, const torch::Tensor& suffix_lens,
                             const torch::Tensor& suffix_tables, double scale, const std::string& isa) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "cascade_decode: q must be [B, Hq, D] and the caches [num_blocks, block_size, Hkv, D]; got ", q.sizes(),
              ", ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "cascade_decode: caches must be contiguous and of one dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "cascade_decode: q has ", Hq, " heads of dim ", D,
              "; the cache has ", Hkv, " heads of dim ", k_cache.size(3));
  const auto ctype = kernel_dtype(k_cache, "k_cache");
  auto gs = int32_table(group_starts, "group_starts", 1), pl = int32_table(prefix_lens, "prefix_lens", 1);
  auto pt = int32_table(prefix_tables, "prefix_tables", 2), sl = int32_table(suffix_lens, "suffix_lens", 1);
  auto st = int32_table(suffix_tables, "suffix_tables", 2);
  const int64_t ng = pl.size(0);
  TORCH_CHECK(gs.size(0) == ng + 1 && sl.size(0) == B && st.size(0) == B && pt.size(0) >= (ng > 0 ? ng : 0),
              "cascade_decode: metadata sizes disagree with ", B, " chains in ", ng, " groups");
  TORCH_CHECK(gs.data_ptr<int32_t>()[0] == 0 && gs.data_ptr<int32_t>()[ng] == B,
              "cascade_decode: group_starts must run from 0 to B=", B);
  check_table_rows(pt, pl, bs, k_cache.size(0), "cascade_decode", "prefix");
  check_table_rows(st, sl, bs, k_cache.size(0), "cascade_decode", "suffix");
  const int32_t* g = gs.data_ptr<int32_t>();
  for (int64_t i = 0; i < ng; ++i)
    TORCH_CHECK(g[i] >= 0 && g[i] <= g[i + 1], "cascade_decode: group_starts must be non-decreasing from 0");
  check_isa(isa, "cascade_decode");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto out = torch::empty({B, Hq, D}, q.options().dtype(torch::kFloat32));
  if (B > 0) {
    prmkern::cascade_decode(qf.data_ptr<float>(), B, Hq, D, k_cache.data_ptr(), v_cache.data_ptr(), ctype, bs, Hkv, ng,
                            gs.data_ptr<int32_t>(), pl.data_ptr<int32_t>(), pt.data_ptr<int32_t>(), pt.size(1),
                            sl.data_ptr<int32_t>(), st.data_ptr<int32_t>(), st.size(1), static_cast<float>(scale),
                            out.data_ptr<float>(), isa.c_str());
  }
  return q.scalar_type() == torch::kFloat32 ? out : out.to(q.scalar_type());
}

// q [T, Hq, D] -> out [T, Hq, D] in q's dtype: causal attention of a prefill's new tokens over the paged caches
// [num_blocks, block_size, Hkv, D]; see paged_attention.h.
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
                                const torch::Tensor& block_tables, double scale, const std::string& isa) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "prefill_attention: q must be [T, Hq, D] and the caches [num_blocks, block_size, Hkv, D]; got ",
              q.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "prefill_attention runs on CPU tensors");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "prefill_attention: caches must be contiguous and of one dtype");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "prefill_attention: q has ", Hq, " heads of dim ",
              D, "; the cache has ", Hkv, " heads of dim ", k_cache.size(3));
  const auto ctype = kernel_dtype(k_cache, "k_cache");
  auto cu = int32_table(cu_seqlens_q, "cu_seqlens_q", 1), sl = int32_table(seq_lens, "seq_lens", 1);
  auto bt = int32_table(block_tables, "block_tables", 2);
  const int64_t S = sl.size(0);
  TORCH_CHECK(cu.size(0) == S + 1 && bt.size(0) >= S, "prefill_attention: ", S, " sequences need cu_seqlens_q [",
              S + 1, "] and block_tables [", S, ", blocks]; got ", cu.sizes(), " and ", bt.sizes());
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* l = sl.data_ptr<int32_t>();
  const int32_t* t = bt.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && c[S] == T, "prefill_attention: cu_seqlens_q must run from 0 to T=", T, "; got ", c[0],
              " .. ", c[S]);
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(c[i + 1] - c[i] >= 0 && c[i + 1] - c[i] <= l[i], "prefill_attention: sequence ", i, " has ",
                c[i + 1] - c[i], " new tokens but length ", l[i], " (accepted: 0 <= new tokens <= length)");
  check_table_rows(bt.narrow(0, 0, S), sl, bs, k_cache.size(0), "prefill_attention", "sequence");
  check_isa(isa, "prefill_attention");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto out = torch::empty({T, Hq, D}, q.options().dtype(torch::kFloat32));
  if (T > 0)
    prmkern::prefill_attention(qf.data_ptr<float>(), T, Hq, D, k_cache.data_ptr(), v_cache.data_ptr(), ctype, bs, Hkv,
                               S, c, l, t, bt.size(1), static_cast<float>(scale), out.data_ptr<float>(), isa.c_str());
  return q.scalar_type() == torch::kFloat32 ? out : out.to(q.scalar_type());
}

// Token indices ([T], int32 or int64) as a contiguous int64 tensor.
torch::Tensor int64_index(const torch::Tensor& t, const char* what, int64_t T) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == T &&
                  (t.scalar_type() == torch::kInt64 || t.scalar_type() == torch::kInt32),
              "rotary_store_kv: ", what, " must be a CPU int64 or int32 tensor [", T, "]; got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  return t.to(torch::kInt64).contiguous();
}

// Neox rotary of q [T, Hq, D] and k [T, Hkv, D] by cos_sin_cache[positions] ([max_positions, D] float32 =
// [cos | sin]); the rotated k and v stored into the caches [num_blocks, block_size, Hkv, D] at slot_mapping (< 0:
// skipped). Returns the rotated q [T, Hq, D] (contiguous, q's dtype). See rotary_store.h.
torch::Tensor rotary_store_kv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& positions, const torch::Tensor& cos_sin_cache,
                              const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                              const torch::Tensor& slot_mapping) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu() && cos_sin_cache.device().is_cpu(),
              "rotary_store_kv runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2),
              "rotary_store_kv: q must be [T, Hq, D] and k, v [T, Hkv, D]; got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  const auto act = kernel_dtype(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "rotary_store_kv: q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK((t->stride(2) == 1 || D <= 1) && (t->stride(1) == D || t->size(1) <= 1),
                "rotary_store_kv: q, k, v must have contiguous heads (strides [any, D, 1]); got strides ",
                t->strides(), " for shape ", t->sizes());
  TORCH_CHECK(D % 2 == 0 && cos_sin_cache.scalar_type() == torch::kFloat32 && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == D && cos_sin_cache.is_contiguous(),
              "rotary_store_kv: cos_sin_cache must be contiguous float32 [max_positions, head_dim=", D,
              "] (head_dim even, full-width rotary); got ", cos_sin_cache.scalar_type(), " ", cos_sin_cache.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == Hkv &&
                  k_cache.size(3) == D && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "rotary_store_kv: caches must be contiguous [num_blocks, block_size, ", Hkv, ", ", D,
              "] of one dtype; got ", k_cache.sizes(), " ", k_cache.scalar_type(), " and ", v_cache.sizes(), " ",
              v_cache.scalar_type());
  const auto ctype = kernel_dtype(k_cache, "k_cache");
  auto pos = int64_index(positions, "positions", T), slots = int64_index(slot_mapping, "slot_mapping", T);
  const int64_t max_pos = cos_sin_cache.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {  // a bad index fails here, not as a wild read or write
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, "rotary_store_kv: token ", t, " has position ", p[t],
                "; the cos/sin cache holds ", max_pos);
    TORCH_CHECK(sl[t] < num_slots, "rotary_store_kv: token ", t, " has slot ", sl[t], " of a pool of ", num_slots,
                " slots");
  }
  auto q_out = torch::empty({T, Hq, D}, q.options());
  if (T > 0 && D > 0)
    prmkern::rotary_store_kv(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), act,
                             T, Hq, Hkv, D, p, cos_sin_cache.data_ptr<float>(), q_out.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), ctype, sl);
  return q_out;
}

prmkern::DType f32_or_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              what, " must be a CPU float32 or bfloat16 tensor; got ", t.scalar_type(), " on ", t.device());
  return t.scalar_type() == torch::kFloat32 ? prmkern::DType::F32 : prmkern::DType::BF16;
}

// x [T, H] (+ residual [T, H]) -> (RMSNorm(x + residual) * weight, x + residual or None); see elementwise.h.
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> add_rms_norm(const torch::Tensor& x,
                                                                     const c10::optional<torch::Tensor>& residual,
                                                                     const torch::Tensor& weight, double eps) {
  const auto dt = f32_or_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.is_contiguous(),
              "add_rms_norm: x must be contiguous [T, H] and weight [H] of x's dtype; got ", x.sizes(), " ",
              x.scalar_type(), " and ", weight.sizes(), " ", weight.scalar_type());
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(), "add_rms_norm: residual must match x; got ", residual->sizes());
  auto out = torch::empty_like(x);
  c10::optional<torch::Tensor> res_out;
  if (has_res) res_out = torch::empty_like(x);
  prmkern::add_rms_norm(x.data_ptr(), has_res ? residual->data_ptr() : nullptr, weight.data_ptr(), dt, x.size(0),
                        x.size(1), static_cast<float>(eps), out.data_ptr(), has_res ? res_out->data_ptr() : nullptr);
  return {out, res_out};
}

// x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]
torch::Tensor silu_and_mul(const torch::Tensor& x) {
  const auto dt = f32_or_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "silu_and_mul: x must be contiguous [T, 2I]; got ", x.sizes());
  auto out = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  prmkern::silu_and_mul(x.data_ptr(), dt, x.size(0), x.size(1) / 2, out.data_ptr());
  return out;
}


// One decoder layer of a decode step (Qwen2 / Llama: no q/k norm), every op in C++ with no Python between them:
// (x + residual) -> RMSNorm -> qkv -> rotary + KV store -> cascade attention -> o_proj -> (+ residual) -> RMSNorm
// -> gate_up -> SiLU-and-mul -> down. x, residual [T, H] (residual None on the first layer: x is the residual);
// weights [out, in] as the checkpoint's, biases optional; returns (mlp output [T, H], residual [T, H]). The same
// values as the layer's modules calling these ops one by one (tests/test_csrc_decode_layer.py).
std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, const torch::Tensor& ln1, double eps1,
    const torch::Tensor& w_qkv, const c10::optional<torch::Tensor>& b_qkv, const torch::Tensor& w_o,
    const c10::optional<torch::Tensor>& b_o, const torch::Tensor& ln2, double eps2, const torch::Tensor& w_gate_up,
    const c10::optional<torch::Tensor>& b_gate_up, const torch::Tensor& w_down,
    const c10::optional<torch::Tensor>& b_down, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const torch::Tensor& positions, const torch::Tensor& cos_sin_cache, const torch::Tensor& k_cache,
    const torch::Tensor& v_cache, const torch::Tensor& slot_mapping, const torch::Tensor& group_starts,
    const torch::Tensor& prefix_lens, const torch::Tensor& prefix_tables, const torch::Tensor& suffix_lens,
    const torch::Tensor& suffix_tables, double scale, const c10::optional<torch::Tensor>& p_qkv,
    const c10::optional<torch::Tensor>& p_o, const c10::optional<torch::Tensor>& p_gate_up,
    const c10::optional<torch::Tensor>& p_down) {
  TORCH_CHECK(x.dim() == 2, "decode_layer: x must be [T, H]; got ", x.sizes());
  const int64_t T = x.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  TORCH_CHECK(w_qkv.dim() == 2 && w_qkv.size(0) == q_size + 2 * kv_size, "decode_layer: w_qkv must have ",
              q_size + 2 * kv_size, " rows for ", num_heads, " / ", num_kv_heads, " heads of ", head_dim, "; got ",
              w_qkv.sizes());
  auto [h, res] = add_rms_norm(x, residual, ln1, eps1);
  torch::Tensor resid = res.has_value() ? *res : x;
  auto qkv = decode_linear(h, w_qkv, b_qkv, p_qkv);  // [T, q + 2 kv]
  auto q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
  auto k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
  auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
  auto q_rot = rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping);
  auto attn = cascade_decode(q_rot, k_cache, v_cache, group_starts, prefix_lens, prefix_tables, suffix_lens,
                             suffix_tables, scale, "");
  auto o = decode_linear(attn.view({T, q_size}), w_o, b_o, p_o);
  auto [h2, res2] = add_rms_norm(o, resid, ln2, eps2);
  auto out = decode_linear(silu_and_mul(decode_linear(h2, w_gate_up, b_gate_up, p_gate_up)), w_down, b_down, p_down);
  return {out, *res2};
}

// logits [R, V] float32 (rows contiguous), u [R] float64 in [0, 1), temperature [R] float32 or None -> (tokens [R]
// int64, ok [R] bool): the sampler's inverse-CDF draw per row; see sampling.h.
std::tuple<torch::Tensor, torch::Tensor> sample_rows(const torch::Tensor& logits, const torch::Tensor& u,
                                                     const c10::optional<torch::Tensor>& temperature) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "sample_rows: logits must be a CPU float32 [R, V] tensor with contiguous rows; got ",
              logits.scalar_type(), " ", logits.sizes(), " strides ", logits.strides(), " on ", logits.device());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_rows: logits have no vocabulary (V = 0)");
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == torch::kFloat64 && u.dim() == 1 && u.size(0) == R,
              "sample_rows: u must be a CPU float64 tensor [", R, "]; got ", u.scalar_type(), " ", u.sizes());
  auto uc = u.contiguous();
  for (int64_t r = 0; r < R; ++r) {
    const double ur = uc.data_ptr<double>()[r];
    TORCH_CHECK(ur >= 0.0 && ur <= 1.0, "sample_rows: row ", r, " has u = ", ur, "; accepted: 0 <= u <= 1");
  }
  torch::Tensor tc;
  if (temperature.has_value() && temperature->defined()) {
    TORCH_CHECK(temperature->device().is_cpu() && temperature->scalar_type() == torch::kFloat32 &&
                    temperature->dim() == 1 && temperature->size(0) == R,
                "sample_rows: temperature must be a CPU float32 tensor [", R, "]; got ", temperature->scalar_type(),
                " ", temperature->sizes());
    tc = temperature->contiguous();
    const float* t = tc.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      TORCH_CHECK(t[r] > 0.f && std::isfinite(t[r]), "sample_rows: row ", r, " has temperature ", t[r],
                  "; a sampled row needs a finite temperature > 0");
  }
  auto tokens = torch::empty({R}, torch::kInt64);
  auto ok = torch::empty({R}, torch::kBool);
  if (R > 0)
    prmkern::sample_rows(logits.data_ptr<float>(), R, V, logits.stride(0),
                         tc.defined() ? tc.data_ptr<float>() : nullptr, uc.data_ptr<double>(),
                         tokens.data_ptr<int64_t>(), reinterpret_cast<uint8_t*>(ok.data_ptr<bool>()));
  return {tokens, ok};
}

// The ceilings of benchmarks/roofline.py (csrc/peak.cpp), each as (by wall time, by the threads' CPU time). kind:
// "fma_avx2", "fma_avx512" or "bf16_dot"; (-1, -1) when this CPU (capped by PRMKERN_ISA) lacks it.
std::tuple<double, double> peak_gflops(const std::string& kind, int64_t threads, int64_t iters, int64_t repeats) {
  static const std::pair<const char*, prmkern::PeakKind> kinds[] = {
      {"fma_avx2", prmkern::PeakKind::FmaAvx2}, {"fma_avx512", prmkern::PeakKind::FmaAvx512},
      {"bf16_dot", prmkern::PeakKind::Bf16Dot}};
  for (const auto& [name, k] : kinds) {
    if (kind == name) {
      TORCH_CHECK(threads >= 1 && iters >= 1 && repeats >= 1, "peak_gflops: threads, iters and repeats must be >= 1; "
                  "got ", threads, ", ", iters, ", ", repeats);
      float sink = 0.f;
      const auto r = prmkern::peak_gflops(k, static_cast<int>(threads), iters, static_cast<int>(repeats), &sink);
      return {r.wall, r.cpu};
    }
  }
  TORCH_CHECK(false, "peak_gflops: kind ", kind, " is not one of fma_avx2, fma_avx512, bf16_dot");
}

// buffer: a contiguous float32 CPU tensor, swept whole `repeats` times by `threads` threads; the best GB/s.
std::tuple<double, double> read_gbs(const torch::Tensor& buffer, int64_t threads, int64_t repeats) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.scalar_type() == torch::kFloat32 && buffer.is_contiguous() &&
                  buffer.numel() > 0 && threads >= 1 && repeats >= 1,
              "read_gbs: buffer must be a non-empty contiguous float32 CPU tensor and threads, repeats >= 1; got ",
              buffer.scalar_type(), " ", buffer.sizes(), ", threads ", threads, ", repeats ", repeats);
  float sink = 0.f;
  const auto r = prmkern::read_gbs(buffer.data_ptr<float>(), buffer.numel(), static_cast<int>(threads),
                                   static_cast<int>(repeats), &sink);
  return {r.wall, r.cpu};
}

// x [M, K] (any float dtype) @ weight [N, K]^T + bias [N] -> [M, N] in x's dtype, for many rows (prefill): the
// blocked AVX2 GEMM on packed, widened weight blocks (csrc/prefill_gemm.cpp). weight: contiguous.
torch::Tensor prefill_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "prefill_linear runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "prefill_linear: x must be [M, K] and weight [N, K]; got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "prefill_linear: weight must be contiguous; got strides ", weight.strides());
  const auto wtype = kernel_dtype(weight, "weight");
  kernel_dtype(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "prefill_linear: bias must be [", N, "]; got ", bias->sizes());
    bf = bias->to(torch::kFloat32).contiguous();
  }
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  prmkern::prefill_gemm(xf.data_ptr<float>(), M, K, weight.data_ptr(), wtype, N,
                        bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prmkern's C++ CPU kernels (csrc/)";
  m.def("cpu_isa", &prmkern::cpu_isa,
        "the widest instruction-set path the kernels take on this CPU ('avx512', 'avx2' or 'scalar'; PRMKERN_ISA caps "
        "it; elementwise kernels stop at AVX2)");
  m.def("bf16_dot", &prmkern::cpu_has_bf16_dot,
        "whether bf16 x bf16 decode GEMMs take the AVX-512 BF16 dot products (PRMKERN_BF16_DOT=0 turns them off)");
  m.def("decode_linear", &decode_linear, "x [M, K] @ weight [N, K]^T + bias, weight streamed once (decode rows)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("panels") = py::none());
  m.def("cascade_decode", &cascade_decode, "cascade paged decode attention over the block pool, in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("group_starts"), py::arg("prefix_lens"),
        py::arg("prefix_tables"), py::arg("suffix_lens"), py::arg("suffix_tables"), py::arg("scale"),
        py::arg("isa") = "");
  m.def("prefill_attention", &prefill_attention,
        "causal attention of a prefill's new tokens over the block pool, in place (cached prefixes included)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_seqlens_q"), py::arg("seq_lens"),
        py::arg("block_tables"), py::arg("scale"), py::arg("isa") = "");
  m.def("rotary_store_kv", &rotary_store_kv,
        "neox rotary of q and k, k and v stored into the paged caches at slot_mapping, one pass; returns rotated q",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("cos_sin_cache"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"));
  m.def("add_rms_norm", &add_rms_norm, "RMSNorm(x + residual) * weight and x + residual, one pass (fp32 / bf16)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("decode_layer", &decode_layer, "one Qwen2 / Llama decoder layer of a decode step, every op in C++",
        py::arg("x"), py::arg("residual"), py::arg("ln1"), py::arg("eps1"), py::arg("w_qkv"), py::arg("b_qkv"),
        py::arg("w_o"), py::arg("b_o"), py::arg("ln2"), py::arg("eps2"), py::arg("w_gate_up"), py::arg("b_gate_up"),
        py::arg("w_down"), py::arg("b_down"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("positions"), py::arg("cos_sin_cache"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("group_starts"), py::arg("prefix_lens"), py::arg("prefix_tables"),
        py::arg("suffix_lens"), py::arg("suffix_tables"), py::arg("scale"), py::arg("p_qkv") = py::none(),
        py::arg("p_o") = py::none(), py::arg("p_gate_up") = py::none(), py::arg("p_down") = py::none());
  m.def("sample_rows", &sample_rows,
        "the sampler's inverse-CDF draw: per row the first token whose cumulative softmax weight exceeds u x total",
        py::arg("logits"), py::arg("u"), py::arg("temperature") = py::none());
  m.def("prefill_linear", &prefill_linear,
        "x [M, K] @ weight [N, K]^T + bias for many rows: blocked AVX2 GEMM on packed, widened weight blocks",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("peak_gflops", &peak_gflops,
        "the best GFLOP/s of `threads` threads of independent FMA (fma_avx2 / fma_avx512) or vdpbf16ps (bf16_dot) "
        "instructions, (by wall time, summed over threads by CPU time); (-1, -1) where this CPU lacks them", py::arg("kind"), py::arg("threads"), py::arg("iters"),
        py::arg("repeats"));
  m.def("read_gbs", &read_gbs, "the best GB/s of `threads` threads summing a float32 buffer, (by wall time, by the longest thread CPU time)", py::arg("buffer"),
        py::arg("threads"), py::arg("repeats"));
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of x = [gate | up], one pass (fp32 / bf16)", py::arg("x"));
}
