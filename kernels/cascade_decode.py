"""Cascade decode in one launch: shared prefixes, per-chain suffixes, split reduction and merge, fused.

A decode step's rows are ordered by sharing group (group_starts); group g's chains share prefix_lens[g] keys
(prefix_block_tables[g]) and each chain b has its own suffix_lens[b] keys (suffix_block_tables[b]). One 1-D grid
holds two kinds of work item, longest first:
- prefix items (group, KV head, prefix split, row tile): up to BLOCK_M (chain, query head) rows of the group times
  one contiguous split of its prefix, one `tl.dot` per K/V tile, so each prefix tile is read from DRAM once per
  step for all chains x query heads of the group (the row tiles of one split are adjacent ids: L2 hits);
- suffix items (chain, KV head, suffix split): the GQA group of one chain over one split of its own suffix.
Every item writes a partial state (out, lse) into slot `split` (prefix) or `P + split` (suffix) of the row's
P + S slots, then increments a per-row arrival counter; the item that arrives last for a row reduces the row's
P + S states by log-sum-exp into the final output and resets the counter to 0 (last-CTA-reduces: no second
launch, no device sync). The slot count P + S is bounded by `cascade_splits` so that the partial states written
stay a small fraction of the KV bytes read (benchmarks/traffic_model.py).

A row whose group has prefix length 0 gets P empty prefix states (merging them changes nothing). Does not decide
when sharing pays (the backend does) and does not store K/V. Counters: int32 [batch, num_heads], zero on entry and
left zero on exit; one launch at a time per counter buffer (the launcher's cached buffer is per device, so
concurrent launches on different streams must pass their own).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .merge_states import finalize_state, merge_weights
from .paged_decode import (LOG2E, MIN_SPLIT_TOKENS, attend_paged_range, check_index, check_kv_cache, dot_precision,
                           lse_buffer, num_sms, out_buffer, resident_ctas, row_tile, target_arch, tile_config)

STATE_BUDGET = 0.10  # partial-state bytes written <= this fraction of the KV bytes read (rule; traffic model)


# P and S are not specialised: the two branches assign `num_splits` and `slot` from them and must agree in type.
@triton.jit(do_not_specialize=["P", "S"])
def _cascade_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, group_starts_ptr, prefix_lens_ptr, prefix_bt_ptr, suffix_lens_ptr,
    suffix_bt_ptr, parts_out_ptr, parts_lse_ptr, counters_ptr, out_ptr, lse_ptr,
    qk_scale, head_dim, group_size, num_kv_heads, num_row_tiles, num_prefix_items, P, S,
    stride_q_b, stride_q_h,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    stride_pbt_g, stride_sbt_b,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_pl_s,
    stride_cnt_b, stride_out_b, stride_out_h, stride_lse_b, stride_lse_h,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    ar = tl.arange(0, BLOCK_M)
    if pid < num_prefix_items:  # ((group * Hkv + kvh) * P + split) * row_tiles + tile
        tile = pid % num_row_tiles
        t = pid // num_row_tiles
        split = t % P
        t = t // P
        kvh = t % num_kv_heads
        g = t // num_kv_heads
        row0 = tl.load(group_starts_ptr + g)
        num_rows = (tl.load(group_starts_ptr + g + 1) - row0) * group_size  # chains x query heads per KV head
        rows = tile * BLOCK_M + ar
        rmask = rows < num_rows
        chain = row0 + rows // group_size
        heads = kvh * group_size + rows % group_size
        length = tl.where(tile * BLOCK_M < num_rows, tl.load(prefix_lens_ptr + g), 0)
        bt_row = prefix_bt_ptr + g.to(tl.int64) * stride_pbt_g
        num_splits = P
        slot = split
    else:  # (chain * Hkv + kvh) * S + split
        t = pid - num_prefix_items
        split = t % S
        t = t // S
        kvh = t % num_kv_heads
        b = t // num_kv_heads
        rmask = ar < group_size
        chain = b + ar * 0
        heads = kvh * group_size + ar
        length = tl.load(suffix_lens_ptr + b)
        bt_row = suffix_bt_ptr + b.to(tl.int64) * stride_sbt_b
        num_splits = S
        slot = P + split
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N  # keys per split, whole tiles
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    chain = chain.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    io_mask = rmask[:, None] & (d[None, :] < head_dim)
    q = tl.load(q_ptr + chain[:, None] * stride_q_b + heads[:, None] * stride_q_h + d[None, :], mask=io_mask,
                other=0.0)  # [BLOCK_M, BLOCK_D]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_paged_range(
        acc, m_i, l_i, q, ar, k_cache_ptr + kvh * stride_kc_h, v_cache_ptr + kvh * stride_vc_h, bt_row,
        start, end, qk_scale, head_dim, stride_kc_blk, stride_kc_slot, stride_vc_blk, stride_vc_slot,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, CAUSAL=False, DOT_PREC=DOT_PREC,
    )
    o, lse = finalize_state(acc, m_i, l_i)
    tl.store(parts_out_ptr + chain[:, None] * stride_po_b + heads[:, None] * stride_po_h + slot * stride_po_s
             + d[None, :], o.to(parts_out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(parts_lse_ptr + chain * stride_pl_b + heads * stride_pl_h + slot * stride_pl_s, lse, mask=rmask)

    # Arrival: all of this CTA's stores are issued before any of its threads publishes (barrier), the release
    # half of acq_rel makes them visible to the row's last arriver, whose acquire half orders its loads after.
    tl.debug_barrier()
    cnt_ptrs = counters_ptr + chain * stride_cnt_b + heads
    old = tl.atomic_add(cnt_ptrs, 1, mask=rmask, sem="acq_rel", scope="gpu")
    last = rmask & (old == P + S - 1)
    tl.debug_barrier()
    if tl.sum(last.to(tl.int32), 0) > 0:
        lmask = last[:, None] & (d[None, :] < head_dim)
        red = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        red_lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, P + S):
            o_s = tl.load(parts_out_ptr + chain[:, None] * stride_po_b + heads[:, None] * stride_po_h
                          + s * stride_po_s + d[None, :], mask=lmask, other=0.0, cache_modifier=".cg")
            l_s = tl.load(parts_lse_ptr + chain * stride_pl_b + heads * stride_pl_h + s * stride_pl_s, mask=last,
                          other=float("-inf"), cache_modifier=".cg")
            w_a, w_b, red_lse = merge_weights(red_lse, l_s)
            # weight 0 must not multiply garbage (an empty state's out is 0, but be strict)
            red = tl.where(w_a[:, None] > 0.0, red * w_a[:, None], 0.0) + tl.where(
                w_b[:, None] > 0.0, o_s.to(tl.float32) * w_b[:, None], 0.0)
        tl.store(out_ptr + chain[:, None] * stride_out_b + heads[:, None] * stride_out_h + d[None, :],
                 red.to(out_ptr.dtype.element_ty), mask=lmask)
        tl.store(lse_ptr + chain * stride_lse_b + heads * stride_lse_h, red_lse, mask=last)
        tl.store(cnt_ptrs, 0, mask=last)  # left zero for the next launch (and the next graph replay)


def cascade_splits(*, batch: int, num_groups: int, num_kv_heads: int, group: int, head_dim: int, itemsize: int,
                   row_tiles: int, max_prefix_len: int, max_suffix_len: int, sms: int,
                   ctas_per_sm: int = 2) -> tuple[int, int]:
    """(P, S): prefix and suffix splits. Rule (unmeasured): one wave at the kernel's occupancy (ctas_per_sm, from
    RESIDENT_CTAS) of equal key counts, no split
    under MIN_SPLIT_TOKENS keys, and P + S slots whose float32 partial states (written once, read once from L2 by
    the reducer) stay <= STATE_BUDGET of the KV bytes the step reads: the larger split count gives way first."""
    prefix_work = num_groups * num_kv_heads * row_tiles * max_prefix_len
    suffix_work = batch * num_kv_heads * max_suffix_len
    per_cta = max(MIN_SPLIT_TOKENS, math.ceil((prefix_work + suffix_work) / max(1, ctas_per_sm * sms)))
    p = max(1, min(64, math.ceil(max_prefix_len / per_cta)))
    s = max(1, min(64, math.ceil(max_suffix_len / per_cta)))
    kv_bytes = (num_groups * max_prefix_len + batch * max_suffix_len) * num_kv_heads * head_dim * 2 * itemsize
    slot_bytes = batch * num_kv_heads * group * (head_dim * 4 + 4)
    slots = max(2, int(STATE_BUDGET * kv_bytes // max(1, slot_bytes)))
    while p + s > slots:
        if p >= s and p > 1:
            p -= 1
        elif s > 1:
            s -= 1
        else:
            break
    return p, s


def _num_warps(block_m: int) -> int:
    """4 warps (2 CTAs per SM on sm_90 at a 64-row tile, ~247 registers, no spill); 8 for 64-row tiles before
    sm_90, where mma.sync at 4 warps spills (tests/kernels/test_aot_compile.py)."""
    arch = target_arch()
    return 8 if block_m >= 64 and arch is not None and arch < 90 else 4


_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers, kept alive: captured CUDA graphs may still point at them


def _counters(device: torch.device, numel: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least numel per device, reused across launches (each launch leaves it zero)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(numel, 4096), dtype=torch.int32, device=device)
    return buf


def cascade_decode(*, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group_starts: torch.Tensor,
                   prefix_lens: torch.Tensor, prefix_block_tables: torch.Tensor, suffix_lens: torch.Tensor,
                   suffix_block_tables: torch.Tensor, scale: float, max_group_size: int,
                   max_prefix_len: int | None = None, max_suffix_len: int | None = None,
                   splits: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                   lse_out: torch.Tensor | None = None,
                   counters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [batch, num_heads, head_dim] over each row's group prefix plus its own suffix.

    group_starts int32 [num_groups + 1] (rows ordered by group, covering 0..batch); prefix_lens int32 [num_groups];
    prefix_block_tables int32 [num_groups, w]; suffix_lens int32 [batch]; suffix_block_tables int32 [batch, w'];
    max_group_size (host int) >= the largest group's chain count (sizes the row tiles); max_prefix_len /
    max_suffix_len (host ints) feed the split rule (without them and without `splits` the launcher syncs);
    splits = (P, S) fixes the split counts (CUDA graphs). counters: optional zeroed int32 [>= batch * num_heads].
    Returns (out [batch, num_heads, head_dim] in `out`'s dtype (default q's), lse [batch, num_heads] float32).
    """
    who = "cascade_decode"
    block_size, num_kv_heads, group = check_kv_cache(q, k_cache, v_cache, who)
    batch, num_heads, head_dim = q.shape
    check_index("group_starts", group_starts, 1, q.device, who)
    num_groups = group_starts.shape[0] - 1
    if num_groups < 0:
        raise ValueError(f"{who}: group_starts must have num_groups + 1 >= 1 entries, got {tuple(group_starts.shape)}")
    check_index("prefix_lens", prefix_lens, 1, q.device, who, rows=num_groups)
    check_index("prefix_block_tables", prefix_block_tables, 2, q.device, who, rows=num_groups)
    check_index("suffix_lens", suffix_lens, 1, q.device, who, rows=batch)
    check_index("suffix_block_tables", suffix_block_tables, 2, q.device, who, rows=batch)
    if not isinstance(max_group_size, int) or max_group_size < 0:
        raise ValueError(f"{who}: max_group_size must be a non-negative int, got {max_group_size!r}")
    out = out_buffer((batch, num_heads, head_dim), q.dtype, q.device, out, who)
    lse_out = lse_buffer((batch, num_heads), q.device, lse_out, who)
    if batch == 0:
        return out, lse_out
    if num_groups == 0 or max_group_size == 0:
        raise ValueError(f"{who}: batch is {batch} but group_starts has {num_groups} groups and max_group_size is "
                         f"{max_group_size}")
    block_m = row_tile(max_group_size * group, q.dtype, cap=64, head_dim=head_dim)
    row_tiles = triton.cdiv(max_group_size * group, block_m)
    if splits is None:
        if max_prefix_len is None:
            max_prefix_len = int(prefix_lens.max().item())
        if max_suffix_len is None:
            max_suffix_len = int(suffix_lens.max().item())
        splits = cascade_splits(batch=batch, num_groups=num_groups, num_kv_heads=num_kv_heads, group=group,
                                head_dim=head_dim, itemsize=q.dtype.itemsize, row_tiles=row_tiles,
                                max_prefix_len=max_prefix_len, max_suffix_len=max_suffix_len, sms=num_sms(q.device),
                                ctas_per_sm=resident_ctas("cascade_decode", head_dim, q.dtype))
    if not (isinstance(splits, tuple) and len(splits) == 2 and all(isinstance(x, int) and x >= 1 for x in splits)):
        raise ValueError(f"{who}: splits must be a tuple of two positive ints (P, S), got {splits!r}")
    p, s = splits
    if counters is None:
        counters = _counters(q.device, batch * num_heads)
    elif counters.dtype != torch.int32 or counters.numel() < batch * num_heads or counters.device != q.device:
        raise ValueError(f"{who}: counters must be int32 with >= {batch * num_heads} zeros on {q.device}, got "
                         f"{counters.dtype} {tuple(counters.shape)} on {counters.device}")
    # [batch, num_heads, P + S, head_dim] float32 partial states (float32: the merge must not round twice)
    parts_out = torch.empty((batch, num_heads, p + s, head_dim), dtype=torch.float32, device=q.device)
    parts_lse = torch.empty((batch, num_heads, p + s), dtype=torch.float32, device=q.device)
    num_prefix_items = num_groups * num_kv_heads * p * row_tiles
    grid = (num_prefix_items + batch * num_kv_heads * s,)
    _cascade_decode_kernel[grid](
        q, k_cache, v_cache, group_starts, prefix_lens, prefix_block_tables, suffix_lens, suffix_block_tables,
        parts_out, parts_lse, counters, out, lse_out,
        scale * LOG2E, head_dim, group, num_kv_heads, row_tiles, num_prefix_items, p, s,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        prefix_block_tables.stride(0), suffix_block_tables.stride(0),
        parts_out.stride(0), parts_out.stride(1), parts_out.stride(2),
        parts_lse.stride(0), parts_lse.stride(1), parts_lse.stride(2),
        num_heads, out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, DOT_PREC=dot_precision(q.dtype),
        num_warps=_num_warps(block_m), **tile_config(head_dim, q.dtype),
    )
    return out, lse_out
