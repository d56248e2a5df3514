"""Write new tokens' K and V into the paged cache through a slot mapping (slot = block * block_size + offset).

One program per token copies its [num_kv_heads, head_dim] key and value rows (cast to the cache dtype); a slot of
-1 means "do not store" (padding, or a token whose KV is already cached). Does not allocate blocks or check that
slots are in range (the block manager owns that).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads, head_dim,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    in_range = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]
    mask = in_range & ((tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0)  # slot -1: store nothing
    k = tl.load(key_ptr + t * stride_key_t + h[:, None] * stride_key_h + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_value_t + h[:, None] * stride_value_h + d[None, :], mask=mask)
    tl.store(k_cache_ptr + blk * stride_kc_blk + off * stride_kc_slot + h[:, None] * stride_kc_h + d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vc_blk + off * stride_vc_slot + h[:, None] * stride_vc_h + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(*, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key / value [num_tokens, num_kv_heads, head_dim] into k_cache / v_cache
    [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping [num_tokens] (int64 or int32; -1 = skip)."""
    who = "store_kv"
    if k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"{who}: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if key.dim() != 3 or tuple(key.shape[1:]) != (num_kv_heads, head_dim) or tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"{who}: key and value must both be [num_tokens, {num_kv_heads}, {head_dim}] to match the "
                         f"cache {tuple(k_cache.shape)}, got {tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"{who}: slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{who}: slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in floats:
            raise TypeError(f"{who}: {name} dtype {t.dtype} not supported; accepted: {floats}")
        if t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous in head_dim, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{who}: k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got {sorted(map(str, devices))}")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
