"""The C++ CPU backend: the torch backend with decode attention and decode GEMMs in prmkern's C++ kernels (csrc/).

The kernels come from prmkern/ops/cpp.py (`cpp_ops()`, the one loader); when they are absent (not built: no
compiler, installed without `--no-build-isolation`, a non-x86 platform) every method takes the torch path. The
backend declares `cpu_kernels`, so the runner also lends them to the model's GEMMs and its one-call decode layer
(prmkern/models/fused_layer.py: the model decides on that, not this backend) and the engine to the sampler.
Decode is the cascade of the torch backend computed without gathering copies: each group's shared prefix is read
from the block pool once for all its chains, each chain's suffix in place, merged by log-sum-exp. The residual
add + RMSNorm and SiLU-and-mul of 2-D fp32/bf16 rows are one C++ pass each (csrc/elementwise.cpp: in bf16 the torch
versions take ~8 and 3 ops, and a decode step's cost is its op count), and so are rotary + the KV store
(csrc/rotary_store.cpp, `rotary_store_kv`, for prefill and decode). Prefill attention reads the pool in place too
(`prefill_attention`: causal tiles of ~64 queries, a cached prefix included).
"""
from __future__ import annotations

import torch

from prmkern.attention.backend import register_backend
from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata
from prmkern.attention.torch_backend import TorchBackend
from prmkern.ops.cpp import cpp_ops

_FUSED_DTYPES = (torch.float32, torch.bfloat16)

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
    cpu_kernels = True  # the runner lends the kernels to the model (GEMMs, the fused decode layer), the engine to
    # the sampler

    def __init__(self) -> None:
        super().__init__()
        self.ops = cpp_ops()

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
        gs, pl, pt, sl, st = meta.cascade_tables_int32()
        return self.ops.cascade_decode(q, k_cache, v_cache, gs, pl, pt, sl, st, scale)
