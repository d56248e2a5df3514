"""Causal attention of new query tokens of several sequences (variable lengths) over their paged KV.

Serves chunked prefill and extension after a prefix-cache hit: sequence s has q_len = cu_seqlens_q[s+1] -
cu_seqlens_q[s] new tokens, the last q_len of its seq_lens[s] keys, and new token i (position seq_lens[s] - q_len
+ i) sees keys 0..its position. store_kv runs first, so every key, old or new, is read from the cache through the
block table. Grid (num_seqs, row tiles, num_kv_heads); a tile's rows are (token, query head of this KV head) pairs,
so the GQA group shares each K/V tile inside one `tl.dot` (the loop is `attend_paged_range` from paged_decode.py).
Does not store K/V, and returns no lse (prefill never merges states).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge_states import finalize_state
from .paged_decode import (LOG2E, attend_paged_range, check_index, check_kv_cache, dot_precision, out_buffer, row_tile,
                           tile_config)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    qk_scale, head_dim, group_size,
    stride_q_t, stride_q_h,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    stride_bt_s,
    stride_out_t, stride_out_h,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + s)
    q_len = tl.load(cu_seqlens_q_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    ctx_len = seq_len - q_len  # keys cached before the new tokens

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] (token, head) pairs of this KV head
    tok = rows // group_size
    heads = kvh * group_size + rows % group_size
    rmask = rows < q_len * group_size  # tiles past this sequence's rows do no work
    q_pos = ctx_len + tok  # causal position of each row's token
    kv_end = tl.minimum(ctx_len + (tile * BLOCK_M + BLOCK_M - 1) // group_size + 1, seq_len)
    kv_end = tl.where(tile * BLOCK_M < q_len * group_size, kv_end, 0)

    d = tl.arange(0, BLOCK_D)
    io_mask = rmask[:, None] & (d[None, :] < head_dim)
    tok_off = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok_off[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :], mask=io_mask,
                other=0.0)  # [BLOCK_M, BLOCK_D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_paged_range(
        acc, m_i, l_i, q, q_pos,
        k_cache_ptr + kvh * stride_kc_h, v_cache_ptr + kvh * stride_vc_h, block_tables_ptr + s * stride_bt_s,
        0, kv_end, qk_scale, head_dim,
        stride_kc_blk, stride_kc_slot, stride_vc_blk, stride_vc_slot,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, CAUSAL=True, DOT_PREC=DOT_PREC,
    )
    out, _ = finalize_state(acc, m_i, l_i)
    tl.store(out_ptr + tok_off[:, None] * stride_out_t + heads[:, None] * stride_out_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill(*, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_q_len: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [num_tokens, num_heads, head_dim] (the new tokens of all sequences, concatenated).

    cu_seqlens_q int32 [num_seqs + 1] (offsets of each sequence's tokens in q); seq_lens int32 [num_seqs] (cached +
    new keys, >= the sequence's q_len); block_tables int32 [num_seqs, max_blocks]; max_q_len (host int) sizes the
    grid and must be >= every q_len. Returns out [num_tokens, num_heads, head_dim] (q's dtype unless `out` given).
    """
    who = "paged_prefill"
    block_size, num_kv_heads, group = check_kv_cache(q, k_cache, v_cache, who)
    num_tokens, num_heads, head_dim = q.shape
    check_index("cu_seqlens_q", cu_seqlens_q, 1, q.device, who)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs < 0:
        raise ValueError(f"{who}: cu_seqlens_q must have num_seqs + 1 >= 1 entries, got {tuple(cu_seqlens_q.shape)}")
    check_index("seq_lens", seq_lens, 1, q.device, who, rows=num_seqs)
    check_index("block_tables", block_tables, 2, q.device, who, rows=num_seqs)
    if not isinstance(max_q_len, int) or max_q_len < 0:
        raise ValueError(f"{who}: max_q_len must be a non-negative int, got {max_q_len!r}")
    out = out_buffer((num_tokens, num_heads, head_dim), q.dtype, q.device, out, who)
    if num_seqs == 0 or num_tokens == 0 or max_q_len == 0:
        return out
    rows = max_q_len * group
    block_m = row_tile(rows, q.dtype, cap=64, head_dim=head_dim)
    tiles = tile_config(head_dim, q.dtype)
    _paged_prefill_kernel[(num_seqs, triton.cdiv(rows, block_m), num_kv_heads)](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out,
        scale * LOG2E, head_dim, group,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, DOT_PREC=dot_precision(q.dtype),
        # 8 warps for a 64 x 128 tile: at 4 warps it needs > 255 registers per thread on sm_80 (spills)
        num_warps=8 if block_m * tiles["BLOCK_D"] >= 64 * 128 else 4, **tiles,
    )
    return out
