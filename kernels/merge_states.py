"""Partial softmax states: the online-softmax helpers, written once, and the kernel that merges states.

A partial state over a key set K is (out, lse): out = softmax-weighted mean of V over K, lse = log(sum exp(scores))
in natural log, float32. An empty key set has lse = -inf and out = 0. Two states over disjoint key sets merge
exactly by their log-sum-exp, which is what lets attention be split along the keys (flash-decoding) and split into
a shared prefix plus per-chain suffixes (cascade attention).

The `@triton.jit` helpers here are the only place the softmax-state arithmetic is written:
- `softmax_tile_step`: the online update of (running max, running sum) by one tile of scores, used by every
  attention kernel's inner loop (paged_decode, paged_prefill, shared_prefix_decode);
- `finalize_state`: turns the running (acc, max, sum) into (out, lse);
- `merge_weights`: the weights with which two normalised states combine, used by `_merge_states_kernel`, which
  serves both the split-K reduce of the decode kernels and the prefix/suffix merge of cascade attention.
Running maxima are kept in base 2 (scores pre-multiplied by log2(e)) so the inner loop uses exp2; `lse` leaves in
natural log. This module does not compute attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LN2 = 0.6931471805599453


@triton.jit
def softmax_tile_step(s, m_i, l_i):
    """One online-softmax step. s [M, N] float32 base-2 scores (-inf where masked); m_i, l_i [M] running max and
    running sum of exp2(s - m_i). Returns p [M, N] = exp2(s - m_new), alpha [M] (rescale for the accumulator),
    m_new, l_new. A row that has seen no key keeps m = -inf, l = 0 and gets p = 0 (no NaN from -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def finalize_state(acc, m_i, l_i):
    """acc [M, D] unnormalised float32, m_i / l_i [M] base-2 running max / sum -> (out [M, D], lse [M] natural log).
    Rows with no key: out = 0, lse = -inf."""
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def merge_weights(lse_a, lse_b):
    """Weights of two normalised states over disjoint key sets: out = w_a * out_a + w_b * out_b, and the merged lse.
    Any shape (elementwise). Both empty -> w_a = w_b = 0 and lse = -inf."""
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    e_a = tl.exp(lse_a - m_safe)
    e_b = tl.exp(lse_b - m_safe)
    total = e_a + e_b
    inv = 1.0 / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    return e_a * inv, e_b * inv, lse


@triton.jit
def _merge_states_kernel(
    a_out_ptr, a_lse_ptr, b_out_ptr, b_lse_ptr, out_ptr, lse_ptr,
    num_heads, head_dim, num_parts,
    stride_a_out_n, stride_a_out_h, stride_a_lse_n, stride_a_lse_h,
    stride_b_out_n, stride_b_out_h, stride_b_out_s, stride_b_lse_n, stride_b_lse_h, stride_b_lse_s,
    stride_out_n, stride_out_h, stride_lse_n, stride_lse_h,
    HAS_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per row n: state a [H, D] (optional) merged with the num_parts states b[:, :, s] in order.
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < num_heads
    mask = hmask[:, None] & (d[None, :] < head_dim)
    if HAS_A:
        acc = tl.load(a_out_ptr + n * stride_a_out_n + h[:, None] * stride_a_out_h + d[None, :],
                      mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
        lse = tl.load(a_lse_ptr + n * stride_a_lse_n + h * stride_a_lse_h, mask=hmask,
                      other=float("-inf")).to(tl.float32)  # [BLOCK_H]
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        lse = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in range(0, num_parts):
        o_b = tl.load(b_out_ptr + n * stride_b_out_n + h[:, None] * stride_b_out_h + s * stride_b_out_s + d[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        lse_b = tl.load(b_lse_ptr + n * stride_b_lse_n + h * stride_b_lse_h + s * stride_b_lse_s, mask=hmask,
                        other=float("-inf")).to(tl.float32)
        w_a, w_b, lse = merge_weights(lse, lse_b)
        # An empty state's out is 0 by contract, but weight 0 must not multiply a NaN/garbage out into the sum.
        acc = tl.where(w_a[:, None] > 0.0, acc * w_a[:, None], 0.0) + tl.where(w_b[:, None] > 0.0,
                                                                              o_b * w_b[:, None], 0.0)
    tl.store(out_ptr + n * stride_out_n + h[:, None] * stride_out_h + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + n * stride_lse_n + h * stride_lse_h, lse, mask=hmask)


def _check_state(name: str, out: torch.Tensor, lse: torch.Tensor, parts: bool) -> None:
    want = 4 if parts else 3
    if out.dim() != want or lse.dim() != want - 1 or tuple(lse.shape) != tuple(out.shape[:-1]):
        layout = "[N, H, S, D] and [N, H, S]" if parts else "[N, H, D] and [N, H]"
        raise ValueError(f"{name}: expected out/lse of shapes {layout}, got {tuple(out.shape)} and {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"{name}: lse must be float32, got {lse.dtype}")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: out must be float32, float16 or bfloat16, got {out.dtype}")
    if out.stride(-1) != 1:
        raise ValueError(f"{name}: out must be contiguous in its last dim, got strides {out.stride()}")


def _outputs(ref: torch.Tensor, out: torch.Tensor | None, lse_out: torch.Tensor | None,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n, h, d = ref.shape[0], ref.shape[1], ref.shape[-1]
    if out is None:
        out = torch.empty((n, h, d), dtype=out_dtype, device=ref.device)
    if lse_out is None:
        lse_out = torch.empty((n, h), dtype=torch.float32, device=ref.device)
    if tuple(out.shape) != (n, h, d) or tuple(lse_out.shape) != (n, h):
        raise ValueError(f"out/lse_out must be {(n, h, d)} and {(n, h)}, got {tuple(out.shape)} and "
                         f"{tuple(lse_out.shape)}")
    if lse_out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"lse_out must be float32 and out contiguous in its last dim, got {lse_out.dtype} and "
                         f"strides {out.stride()}")
    if out.device != ref.device or lse_out.device != ref.device:
        raise ValueError(f"out/lse_out must be on {ref.device}, got {out.device} and {lse_out.device}")
    return out, lse_out


def _launch(a: tuple[torch.Tensor, torch.Tensor] | None, b_out: torch.Tensor, b_lse: torch.Tensor,
            out: torch.Tensor, lse_out: torch.Tensor) -> None:
    n, h, s, d = b_out.shape
    if n == 0:
        return
    a_out, a_lse = a if a is not None else (b_out, b_lse)  # dummies when HAS_A is False (never read)
    _merge_states_kernel[(n,)](
        a_out, a_lse, b_out, b_lse, out, lse_out,
        h, d, s,
        a_out.stride(0), a_out.stride(1), a_lse.stride(0), a_lse.stride(1),
        b_out.stride(0), b_out.stride(1), b_out.stride(2), b_lse.stride(0), b_lse.stride(1), b_lse.stride(2),
        out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
        HAS_A=a is not None, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
    )


def merge_states(*, out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                 out: torch.Tensor | None = None,
                 lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial states over disjoint key sets.

    out_a [N, H, D], lse_a [N, H] float32; out_b / lse_b the same shapes, or [N, H, S, D] / [N, H, S] for S
    unreduced parts (e.g. the splits of a split-K kernel), merged in one pass. Returns (out [N, H, D] in `out`'s
    dtype, default out_a's; lse [N, H] float32). `out` may alias out_a (each row is read before it is written).
    """
    _check_state("merge_states(out_a, lse_a)", out_a, lse_a, parts=False)
    parts = lse_b.dim() == 3
    _check_state("merge_states(out_b, lse_b)", out_b, lse_b, parts=parts)
    b_out = out_b if parts else out_b.unsqueeze(2)
    b_lse = lse_b if parts else lse_b.unsqueeze(2)
    if b_out.shape[:2] != out_a.shape[:2] or b_out.shape[-1] != out_a.shape[-1]:
        raise ValueError(f"merge_states: states disagree in shape: out_a {tuple(out_a.shape)}, "
                         f"out_b {tuple(out_b.shape)}")
    devices = {t.device for t in (out_a, lse_a, out_b, lse_b)}
    if len(devices) != 1:
        raise ValueError(f"merge_states: all inputs must be on one device, got {sorted(map(str, devices))}")
    out, lse_out = _outputs(out_a, out, lse_out, out_a.dtype)
    _launch((out_a, lse_a), b_out, b_lse, out, lse_out)
    return out, lse_out


def reduce_states(*, parts_out: torch.Tensor, parts_lse: torch.Tensor, out: torch.Tensor | None = None,
                  lse_out: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce S partial states per row into one: parts_out [N, H, S, D], parts_lse [N, H, S] float32 ->
    (out [N, H, D] in `out_dtype` (default parts_out's), lse [N, H] float32). The split-K reduce."""
    _check_state("reduce_states(parts_out, parts_lse)", parts_out, parts_lse, parts=True)
    if parts_out.device != parts_lse.device:
        raise ValueError(f"reduce_states: inputs on {parts_out.device} and {parts_lse.device}")
    out, lse_out = _outputs(parts_out, out, lse_out, out_dtype or parts_out.dtype)
    _launch(None, parts_out, parts_lse, out, lse_out)
    return out, lse_out
