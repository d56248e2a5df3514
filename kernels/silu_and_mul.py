"""SwiGLU's activation: x [..., 2 * I] = [gate | up] -> silu(gate) * up [..., I], one row tile per program.

Matches AttentionBackend.silu_and_mul rounding: silu computed in float32 and rounded to x's dtype, then multiplied
by `up` and rounded again (as torch does in two ops). Does not do the projections around it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr,
    inter,
    stride_x_t, stride_out_t,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x_t + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * stride_out_t + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(*, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2 * I] -> silu(x[..., :I]) * x[..., I:] as [..., I] in x's dtype (or into `out`)."""
    who = "silu_and_mul"
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats:
        raise TypeError(f"{who}: x must be floating ({floats}), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"{who}: x must be [..., 2 * intermediate], got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    shape = tuple(x.shape[:-1]) + (inter,)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{who}: out must be {shape} {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype} "
                         f"on {out.device}")
    x2 = x.reshape(-1, 2 * inter)  # [T, 2I]
    out2 = out.view(-1, inter)
    for name, t in (("x", x2), ("out", out2)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous in its last dim, got strides {t.stride()}")
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out2, inter, x2.stride(0), out2.stride(0), BLOCK=block,
    )
    return out
