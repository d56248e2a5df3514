"""The C++ CPU backend: the torch backend with decode attention and decode GEMMs in prmkern's C++ kernels (csrc/).

`cpp_ops()` loads the extension `prmkern._C` once; when it is absent (not built: no compiler, installed without
`--no-build-isolation`, a non-x86 platform) it prints one line and returns None, and callers take the torch path.
Decode is the cascade of the torch backend computed without gathering copies: each group's shared prefix is read
from the block pool once for all its chains, each chain's suffix in place, merged by log-sum-exp. The residual
add + RMSNorm and SiLU-and-mul of 2-D fp32/bf16 rows are one C++ pass each (csrc/elementwise.cpp: in bf16 the torch
versions take ~8 and 3 ops, and a decode step's cost is its op count), and so are rotary + the KV store
(csrc/rotary_store.cpp, `rotary_store_kv`, for prefill and decode). Prefill attention reads the pool in place too
(`prefill_attention`: causal tiles of ~64 queries, a cached prefix included).
"""
from __future__ import annotations

import weakref
from types import ModuleType

import torch

from prmkern.attention.backend import register_backend
from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata
from prmkern.attention.torch_backend import TorchBackend
from prmkern.ops import extension
from prmkern.models.packed_gemm import CPP_MAX_ROWS

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def cpp_ops() -> ModuleType | None:
    """The C++ kernels module, or None (with a one-line notice on stderr the first time) when it cannot load; see
    prmkern/ops/extension.py (PRMKERN_DISABLE_CPP=1 disables it, for A/B runs)."""
    return extension.load()


_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _heads_contiguous(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.stride(2) == 1 and (x.stride(1) == x.shape[2] or x.shape[1] <= 1)


def _rotary_fusable(q, k, v, cos_sin_cache, k_cache, v_cache) -> bool:
    """What the C++ rotary + store takes: CPU tensors, q / k / v of one dtype among fp32/bf16/fp16 with contiguous
    heads (the decoder's views of the fused qkv qualify), a float32 full-width cos/sin cache, contiguous caches."""
    return (q.device.type == "cpu" and q.dtype in _CACHE_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and all(_heads_contiguous(x) for x in (q, k, v)) and cos_sin_cache.dtype == torch.float32
            and cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == q.shape[2] and cos_sin_cache.is_contiguous()
            and k_cache.dtype in _CACHE_DTYPES and v_cache.dtype == k_cache.dtype and k_cache.is_contiguous()
            and v_cache.is_contiguous())


@register_backend
class CppBackend(TorchBackend):
    name = "cpp"

    def __init__(self) -> None:
        super().__init__()
        self.ops = cpp_ops()
        self._tables: tuple[DecodeMetadata, tuple] | None = None
        # per decoder layer: (the objects its arguments came from, its static decode_layer arguments or None)
        self._layer_args: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def rms_norm(self, x, weight, eps, residual=None):
        if (self.ops is None or x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _FUSED_DTYPES
                or weight.dtype != x.dtype or not x.is_contiguous()
                or (residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()))):
            return super().rms_norm(x, weight, eps, residual)
        return self.ops.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        if self.ops is None or x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _FUSED_DTYPES \
                or not x.is_contiguous():
            return super().silu_and_mul(x)
        return self.ops.silu_and_mul(x)

    def rotary_store_kv(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, all_valid=False):
        """Rotary of q and k and the store of k, v into the caches in one C++ pass (csrc/rotary_store.cpp); the
        torch pair (~12 ops per layer) for what the kernel does not take."""
        if self.ops is None or not _rotary_fusable(q, k, v, cos_sin_cache, k_cache, v_cache):
            return super().rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                           all_valid)
        return self.ops.rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)

    def _int32_tables(self, meta: DecodeMetadata) -> tuple:
        if self._tables is None or self._tables[0] is not meta:  # once per step, shared by every layer
            self._tables = (meta, tuple(t.to(torch.int32).contiguous() for t in (
                meta.group_starts, meta.prefix_lens, meta.prefix_block_tables, meta.suffix_lens,
                meta.suffix_block_tables)))
        return self._tables[1]

    def prefill(self, q, k_cache, v_cache, meta: PrefillMetadata, scale):
        """Causal attention of the new tokens read in place from the pool (csrc `prefill_attention`: no per-sequence
        gather of K/V, no SDPA call per sequence, fp32 softmax for every cache dtype); torch's for what it does not
        take."""
        if (self.ops is None or q.device.type != "cpu" or q.dim() != 3 or k_cache.dtype not in _CACHE_DTYPES
                or v_cache.dtype != k_cache.dtype or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
            return super().prefill(q, k_cache, v_cache, meta, scale)
        i32 = torch.int32
        return self.ops.prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q.to(i32), meta.seq_lens.to(i32),
                                          meta.block_tables.to(i32), scale)

    def decode(self, q, k_cache, v_cache, meta: DecodeMetadata, scale):
        if self.ops is None or q.device.type != "cpu":
            return super().decode(q, k_cache, v_cache, meta, scale)
        gs, pl, pt, sl, st = self._int32_tables(meta)
        return self.ops.cascade_decode(q, k_cache, v_cache, gs, pl, pt, sl, st, scale)

    def decode_layer(self, layer, x, residual, positions, ctx):
        """A whole decoder layer of a decode step in one C++ call (`_C.decode_layer`: the same ops as the modules
        call one by one, without ~10 Python-level calls per layer, which cost ~1 ms of a 12 ms step of the 39M
        model), or None when this layer / step is not one it takes: Qwen3's q/k norm, more rows than the C++ GEMM
        takes, fp16, a prefill, forward hooks (tensor parallelism's all-reduce), another device."""
        meta = ctx.attn_metadata
        if (self.ops is None or meta.prefill is not None or meta.decode is None or x.device.type != "cpu"
                or x.dim() != 2 or x.shape[0] > CPP_MAX_ROWS or x.dtype not in _FUSED_DTYPES or not x.is_contiguous()
                or (residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()))):
            return None
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(m._forward_hooks or m._forward_pre_hooks for m in linears):  # hooks can come at any time
            return None
        k_cache, v_cache = ctx.kv_caches[attn.layer_index]
        # What does not change between steps is checked (and its arguments gathered) once per layer, keyed by
        # identity on everything it gathers so that a replaced weight or cache is seen: this method's Python took
        # ~28 us a call with every check each step, ~17 us so (C++ call stubbed out; AMD EPYC, 39M model).
        key = (x.dtype, k_cache, v_cache, ctx.cos_sin_cache, layer.input_layernorm.weight,
               layer.post_attention_layernorm.weight, *(m.weight for m in linears), *(m.bias for m in linears))
        cached = self._layer_args.get(layer)
        if cached is None or len(cached[0]) != len(key) or any(a is not b for a, b in zip(cached[0], key)):
            cached = (key, self._static_layer_args(layer, x.dtype, k_cache, v_cache, ctx.cos_sin_cache))
            self._layer_args[layer] = cached
        static = cached[1]
        if static is None:
            return None
        gs, pl, pt, sl, st = self._int32_tables(meta.decode)
        before, after = static
        # the weights' column panels, checked against the weights' versions every call (a stale copy is re-packed)
        panels = tuple(m.decode_panels() for m in linears)
        return self.ops.decode_layer(x, residual, *before, positions, ctx.cos_sin_cache, k_cache, v_cache,
                                     meta.slot_mapping, gs, pl, pt, sl, st, *after, *panels)

    @staticmethod
    def _static_layer_args(layer, dtype, k_cache, v_cache, cs) -> tuple[tuple, tuple] | None:
        """The arguments of `_C.decode_layer` that are the layer's own (norms, weights, heads) around the per-step
        ones, or None when the layer is not one it takes (q/k norm, a weight not in `dtype` or without contiguous
        rows, an unpacked C++ path, a cache or rotary table it does not read)."""
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if attn.q_norm is not None or any(m.cpp is None or m.weight.dtype != dtype or m.weight.stride(1) != 1
                                          for m in linears):
            return None
        if (cs.dtype != torch.float32 or cs.dim() != 2 or cs.shape[1] != attn.head_dim or not cs.is_contiguous()
                or k_cache.dtype not in _CACHE_DTYPES or v_cache.dtype != k_cache.dtype
                or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
            return None
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        before = (ln1.weight, ln1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
                  ln2.weight, ln2.eps, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, mlp.down_proj.weight,
                  mlp.down_proj.bias, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        return before, (attn.scale,)
