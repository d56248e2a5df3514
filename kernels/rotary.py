"""Neox-style rotary position embedding applied in place to q and k, one program per token.

Reads cos/sin from the model's cos_sin_cache [max_pos, head_dim] float32 = [cos | sin] over the head_dim / 2
frequencies, so any frequency scaling (llama3's included) is whatever the model baked into the cache; the kernel
does not compute frequencies. Matches AttentionBackend.apply_rotary: rotation in float32, rounded to q/k's dtype.
Positions are not range-checked on the device (a position >= max_pos reads out of bounds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, cos, sin, num_heads, half,
                  stride_x_h,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate in place the [num_heads, 2 * half] rows at x_ptr (one token) by cos/sin [BLOCK_HALF] float32."""
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_heads) & (c[None, :] < half)
    p1 = x_ptr + h[:, None] * stride_x_h + c[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    num_q_heads, num_k_heads, half,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs_pos,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    cmask = c < half
    cos = tl.load(cos_sin_ptr + pos * stride_cs_pos + c, mask=cmask, other=0.0)  # [BLOCK_HALF] float32
    sin = tl.load(cos_sin_ptr + pos * stride_cs_pos + half + c, mask=cmask, other=0.0)
    _rotate_heads(q_ptr + t * stride_q_t, cos, sin, num_q_heads, half, stride_q_h,
                  BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_k_t, cos, sin, num_k_heads, half, stride_k_h,
                  BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF)


def rotary(*, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place at positions [T] (int64 or int32) with cos_sin_cache
    [max_pos, D] float32; returns (q, k). q and k may be strided views (e.g. of a fused qkv output)."""
    who = "rotary"
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: q must be [T, Hq, D] and k [T, Hkv, D] with the same T and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"{who}: head_dim must be even, got q {tuple(q.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"{who}: cos_sin_cache must be [max_pos, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.dtype != torch.float32:
        raise TypeError(f"{who}: cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(f"{who}: positions must be [T={num_tokens}], got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{who}: positions must be int64 or int32, got {positions.dtype}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in floats or k.dtype not in floats:
        raise TypeError(f"{who}: q and k must be floating ({floats}), got {q.dtype} and {k.dtype}")
    devices = {t.device for t in (q, k, positions, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous in its last dim, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.shape[1], k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return q, k
