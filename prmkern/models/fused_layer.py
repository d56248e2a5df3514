"""A decode step's decoder layer as one C++ call (`_C.decode_layer`), when the model runs on the C++ CPU kernels.

The model decides (models/decoder.py: `DecoderLayer.forward` asks this first when the runner lent the model the
kernels); the attention backend only provides attention. The call runs the same ops as the modules call one by
one, in the same order (bit-identical: tests/test_csrc_decode_layer.py), without ~10 Python-level calls per layer,
which cost ~1 ms of a 12 ms step of the 39M model. It returns None for what it does not take: Qwen3's q/k norm,
more rows than the C++ GEMM takes, fp16, a prefill, forward hooks (tensor parallelism's all-reduce), another
device, a weight without contiguous rows or not in the activations' dtype.
"""
from __future__ import annotations

import weakref
from types import ModuleType
from typing import Any

import torch

from prmkern.ops.cpp import CPP_MAX_ROWS

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedDecoderLayer:
    """Shared by every layer of one model; holds per layer the arguments that do not change between steps."""

    def __init__(self, ops: ModuleType):
        self.ops = ops
        # per decoder layer: (the objects its arguments came from, its static decode_layer arguments or None)
        self._layer_args: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


    def forward(self, layer: Any, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                ctx: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, residual) after `layer` on a decode step, or None when the step or layer is not one it takes."""
        meta = ctx.attn_metadata
        if (meta.prefill is not None or meta.decode is None or x.device.type != "cpu" or x.dim() != 2
                or x.shape[0] > CPP_MAX_ROWS or x.dtype not in _FUSED_DTYPES or not x.is_contiguous()
                or (residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()))):
            return None
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(m._forward_hooks or m._forward_pre_hooks for m in linears):  # hooks can come at any time
            return None
        k_cache, v_cache = ctx.kv_caches[attn.layer_index]
        # What does not change between steps is checked (and its arguments gathered) once per layer, keyed by
        # identity on everything it gathers so that a replaced weight or cache is seen (the Python of this method
        # per call: docs/cpu_kernels.md).
        key = (x.dtype, k_cache, v_cache, ctx.cos_sin_cache, layer.input_layernorm.weight,
               layer.post_attention_layernorm.weight, *(m.weight for m in linears), *(m.bias for m in linears))
        cached = self._layer_args.get(layer)
        if cached is None or len(cached[0]) != len(key) or any(a is not b for a, b in zip(cached[0], key)):
            cached = (key, _static_layer_args(layer, x.dtype, k_cache, v_cache, ctx.cos_sin_cache))
            self._layer_args[layer] = cached
        static = cached[1]
        if static is None:
            return None
        gs, pl, pt, sl, st = meta.decode.cascade_tables_int32()
        before, after = static
        # the weights' column panels, checked against the weights' versions every call (a stale copy is re-packed)
        panels = tuple(m.decode_panels() for m in linears)
        return self.ops.decode_layer(x, residual, *before, positions, ctx.cos_sin_cache, k_cache, v_cache,
                                     meta.slot_mapping, gs, pl, pt, sl, st, *after, *panels)


def _static_layer_args(layer: Any, dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cs: torch.Tensor) -> tuple[tuple, tuple] | None:
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
