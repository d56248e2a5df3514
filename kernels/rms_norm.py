"""RMSNorm with an optional fused residual add, one program per row.

Semantics equal to AttentionBackend.rms_norm: with a residual, s = x + residual (rounded to x's dtype) is both the
new residual and the input of the norm; normed = (s / rms(s)).to(x.dtype) * weight, statistics in float32. Does not
normalise over anything but the last dim and does not update tensors in place unless `out`/`residual_out` say so.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps,
    stride_x_t, stride_residual_t, stride_out_t, stride_residual_out_t,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + t * stride_x_t + cols, mask=mask, other=0.0)  # [BLOCK] in x's dtype
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + t * stride_residual_t + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like torch's x + residual
        tl.store(residual_out_ptr + t * stride_residual_out_t + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # .to(x.dtype) before the weight, as reference
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out_t + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(*, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None,
             residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., hidden], weight [hidden], residual like x (optional). Returns (normed in the promoted dtype of x and
    weight, like torch; x + residual or None). `out` / `residual_out` may be given (residual_out may alias residual
    or x: each row is read before it is written)."""
    who = "rms_norm"
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats or weight.dtype not in floats:
        raise TypeError(f"{who}: x and weight must be floating ({floats}), got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{who}: weight must be [hidden] with hidden = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if residual is not None and (tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype):
        raise ValueError(f"{who}: residual must match x: x {tuple(x.shape)} {x.dtype}, residual "
                         f"{tuple(residual.shape)} {residual.dtype}")
    devices = {t.device for t in (x, weight, residual, out, residual_out) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got {sorted(map(str, devices))}")
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [T, hidden] (a view when x is row-contiguous)
    res2 = residual.reshape(-1, hidden) if residual is not None else None
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(x)
    for name, t, dtype in (("out", out, out_dtype), ("residual_out", residual_out, x.dtype)):
        if t is not None and (tuple(t.shape) != tuple(x.shape) or t.dtype != dtype):
            raise ValueError(f"{who}: {name} must be {tuple(x.shape)} {dtype}, got {tuple(t.shape)} {t.dtype}")
    out2 = out.view(-1, hidden)
    rout2 = residual_out.view(-1, hidden) if residual_out is not None else None
    for name, t in (("x", x2), ("residual", res2), ("weight", weight), ("out", out2), ("residual_out", rout2)):
        if t is not None and t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous in its last dim, got strides {t.stride()}")
    if x2.shape[0] == 0:
        return out, residual_out
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2 if res2 is not None else x2, weight, out2, rout2 if rout2 is not None else out2,
        hidden, float(eps),
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0),
        rout2.stride(0) if rout2 is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 4096 else 8,
    )
    return out, residual_out
