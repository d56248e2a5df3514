"""Decode attention of groups of chains over their shared prefix, reading each prefix KV tile once per group.

The prefix half of cascade attention (Hydragen, FlashInfer's cascade): the chains of group g are the query rows
group_starts[g]:group_starts[g+1] and share prefix_lens[g] leading keys (prefix_block_tables[g]). A program takes up
to BLOCK_M (chain, query head) rows of one KV head, all of the group's chains x the GQA group, and multiplies them
against each prefix K/V tile in one `tl.dot`, so the prefix is read once per step per group (per row tile) instead
of once per chain. Grid (num_groups, num_kv_heads, num_splits x row tiles), the prefix optionally split along its
length for occupancy (a few groups would not fill the GPU), the splits then reduced by `reduce_states`.

Outputs a partial state per chain (out, lse), to be merged with the chain's suffix state from `paged_decode` by
`merge_states`. A group with prefix length 0 gets out = 0, lse = -inf (merging it changes nothing). Does not look
at the suffixes and does not decide when sharing pays (the backend does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge_states import finalize_state, reduce_states
from .paged_decode import (LOG2E, attend_paged_range, check_index, check_kv_cache, dot_precision, lse_buffer,
                           num_splits_rule, out_buffer, row_tile, tile_config)


@triton.jit
def _shared_prefix_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, group_starts_ptr, prefix_lens_ptr, prefix_block_tables_ptr, out_ptr, lse_ptr,
    qk_scale, head_dim, group_size, num_row_tiles,
    stride_q_b, stride_q_h,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    stride_pbt_g,
    stride_out_b, stride_out_h, stride_out_s, stride_lse_b, stride_lse_h, stride_lse_s,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    # Row tiles of one split are adjacent program ids, so they read the same prefix tiles close in time (L2 hits).
    tile = tl.program_id(2) % num_row_tiles
    split = tl.program_id(2) // num_row_tiles
    num_splits = tl.num_programs(2) // num_row_tiles

    row0 = tl.load(group_starts_ptr + g)
    num_rows = (tl.load(group_starts_ptr + g + 1) - row0) * group_size  # chains x query heads per KV head
    prefix_len = tl.load(prefix_lens_ptr + g)
    chunk = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, prefix_len)
    end = tl.where(tile * BLOCK_M < num_rows, end, start)  # a row tile past this group's rows does no work

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rmask = rows < num_rows
    chain = (row0 + rows // group_size).to(tl.int64)  # batch row of each query row
    heads = kvh * group_size + rows % group_size
    d = tl.arange(0, BLOCK_D)
    io_mask = rmask[:, None] & (d[None, :] < head_dim)
    q = tl.load(q_ptr + chain[:, None] * stride_q_b + heads[:, None] * stride_q_h + d[None, :], mask=io_mask,
                other=0.0)  # [BLOCK_M, BLOCK_D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_paged_range(
        acc, m_i, l_i, q, rows,
        k_cache_ptr + kvh * stride_kc_h, v_cache_ptr + kvh * stride_vc_h, prefix_block_tables_ptr + g * stride_pbt_g,
        start, end, qk_scale, head_dim,
        stride_kc_blk, stride_kc_slot, stride_vc_blk, stride_vc_slot,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, CAUSAL=False, DOT_PREC=DOT_PREC,
    )
    out, lse = finalize_state(acc, m_i, l_i)
    tl.store(out_ptr + chain[:, None] * stride_out_b + heads[:, None] * stride_out_h + split * stride_out_s
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + chain * stride_lse_b + heads * stride_lse_h + split * stride_lse_s, lse, mask=rmask)


def shared_prefix_decode(*, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         group_starts: torch.Tensor, prefix_lens: torch.Tensor, prefix_block_tables: torch.Tensor,
                         scale: float, max_group_size: int, max_prefix_len: int | None = None,
                         num_splits: int | None = None, out: torch.Tensor | None = None,
                         lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention state of each chain over its group's shared prefix.

    q [batch, num_heads, head_dim], rows ordered by group; group_starts int32 [num_groups + 1] (must cover rows
    0..batch); prefix_lens int32 [num_groups] (0 = no shared prefix); prefix_block_tables int32
    [num_groups, max_prefix_blocks]; max_group_size (host int) >= the largest group's chain count, sizes the grid;
    max_prefix_len (host int) only feeds the split rule (without it and without num_splits the launcher syncs).
    Returns (out [batch, num_heads, head_dim] in `out`'s dtype (default q's), lse [batch, num_heads] float32).
    """
    who = "shared_prefix_decode"
    block_size, num_kv_heads, group = check_kv_cache(q, k_cache, v_cache, who)
    batch, num_heads, head_dim = q.shape
    check_index("group_starts", group_starts, 1, q.device, who)
    num_groups = group_starts.shape[0] - 1
    if num_groups < 0:
        raise ValueError(f"{who}: group_starts must have num_groups + 1 >= 1 entries, got {tuple(group_starts.shape)}")
    check_index("prefix_lens", prefix_lens, 1, q.device, who, rows=num_groups)
    check_index("prefix_block_tables", prefix_block_tables, 2, q.device, who, rows=num_groups)
    if not isinstance(max_group_size, int) or max_group_size < 0:
        raise ValueError(f"{who}: max_group_size must be a non-negative int, got {max_group_size!r}")
    out = out_buffer((batch, num_heads, head_dim), q.dtype, q.device, out, who)
    lse_out = lse_buffer((batch, num_heads), q.device, lse_out, who)
    if batch == 0 or num_groups == 0:
        return out, lse_out
    if max_group_size == 0:
        raise ValueError(f"{who}: max_group_size is 0 but batch is {batch}")

    rows = max_group_size * group
    block_m = row_tile(rows, q.dtype, cap=128, head_dim=head_dim)
    num_row_tiles = triton.cdiv(rows, block_m)
    if num_splits is None:
        if max_prefix_len is None:
            max_prefix_len = int(prefix_lens.max().item())
        num_splits = num_splits_rule(num_groups * num_kv_heads * num_row_tiles, max_prefix_len, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{who}: num_splits must be a positive int, got {num_splits!r}")

    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(2), lse_out.unsqueeze(2)
    else:  # [batch, num_heads, num_splits, head_dim] float32, reduced below
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _shared_prefix_decode_kernel[(num_groups, num_kv_heads, num_splits * num_row_tiles)](
        q, k_cache, v_cache, group_starts, prefix_lens, prefix_block_tables, part_out, part_lse,
        scale * LOG2E, head_dim, group, num_row_tiles,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        prefix_block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, DOT_PREC=dot_precision(q.dtype),
        # 8 warps for 128-row tiles and for head dim 128: at 4 warps ptxas holds a 16 x 128 bf16 tile to 96
        # registers and spills (tests/kernels/test_aot_compile.py)
        num_warps=8 if block_m >= 128 or head_dim > 64 else 4, **tile_config(head_dim, q.dtype),
    )
    if num_splits > 1:
        reduce_states(parts_out=part_out, parts_lse=part_lse, out=out, lse_out=lse_out)
    return out, lse_out
