"""Decode attention over a paged KV cache: one query token per sequence, flash-decoding split along the KV length.

Grid (batch, num_kv_heads, num_splits): each program takes all query heads of one KV head (the GQA group, padded
to 16 rows so it is one `tl.dot`) against one contiguous split of its sequence's keys, read through the block
table, and writes a partial state (out, lse); `reduce_states` (merge_states.py) then combines the splits by
log-sum-exp. Splits are sized per sequence in the kernel (ceil(seq_len / num_splits)), so the grid depends only
on (batch, num_kv_heads, num_splits), never on the lengths. Returns (out, lse), so it also serves as the suffix
half of cascade attention (shared_prefix_decode.py does the prefix half).

Also defines `attend_paged_range`, the one KV-tile loop (gather K/V tiles through a block-table row, scores by
`tl.dot`, online softmax) that paged_prefill and shared_prefix_decode reuse. Does not store K/V (store_kv.py) and
knows nothing of sequences beyond block tables and lengths.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .merge_states import finalize_state, reduce_states, softmax_tile_step

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the reduce than it gains in parallelism (rule)


@triton.jit
def attend_paged_range(
    acc, m_i, l_i, q, q_pos,
    k_head_ptr, v_head_ptr, bt_row_ptr,
    start, end, qk_scale, head_dim,
    stride_kc_blk, stride_kc_slot, stride_vc_blk, stride_vc_slot,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Attend query rows q [M, BLOCK_D] (cache dtype) to keys [start, end) of one sequence, one KV head.

    acc [M, BLOCK_D] float32 unnormalised, m_i / l_i [M] base-2 running max / sum (see merge_states.py);
    k_head_ptr / v_head_ptr point at the KV head's slice of the caches [num_blocks, block_size, ...];
    bt_row_ptr at the block-table row (int32). With CAUSAL, key position j is seen by row r only if
    j <= q_pos[r]. qk_scale = softmax scale * log2(e). Returns the updated (acc, m_i, l_i).
    """
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    # Block ids one tile ahead: the K/V addresses of a tile never wait on a block-table load of the same iteration,
    # so the pipeliner can keep several K/V tiles in flight.
    blk_next = tl.load(bt_row_ptr + (start + offs_n) // BLOCK_SIZE, mask=start + offs_n < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] key positions
        valid = pos < end
        blk = blk_next.to(tl.int64)
        ahead = pos + BLOCK_N
        blk_next = tl.load(bt_row_ptr + ahead // BLOCK_SIZE, mask=ahead < end, other=0)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_head_ptr + blk[:, None] * stride_kc_blk + slot[:, None] * stride_kc_slot + d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [M, BLOCK_N]
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = softmax_tile_step(s, m_i, l_i)
        v = tl.load(v_head_ptr + blk[:, None] * stride_vc_blk + slot[:, None] * stride_vc_slot + d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    qk_scale, head_dim, group_size,
    stride_q_b, stride_q_h,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_vc_blk, stride_vc_slot, stride_vc_h,
    stride_bt_b,
    stride_out_b, stride_out_h, stride_out_s, stride_lse_b, stride_lse_h, stride_lse_s,
    BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N  # tokens per split, whole tiles
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)  # empty when start >= seq_len

    r = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    rmask = r < group_size
    heads = kvh * group_size + r  # [BLOCK_G] query heads of this KV head
    io_mask = rmask[:, None] & (d[None, :] < head_dim)
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :], mask=io_mask, other=0.0)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc, m_i, l_i = attend_paged_range(
        acc, m_i, l_i, q, r,
        k_cache_ptr + kvh * stride_kc_h, v_cache_ptr + kvh * stride_vc_h, block_tables_ptr + b * stride_bt_b,
        start, end, qk_scale, head_dim,
        stride_kc_blk, stride_kc_slot, stride_vc_blk, stride_vc_slot,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, CAUSAL=False, DOT_PREC=DOT_PREC,
    )
    out, lse = finalize_state(acc, m_i, l_i)
    tl.store(out_ptr + b * stride_out_b + heads[:, None] * stride_out_h + split * stride_out_s + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + b * stride_lse_b + heads * stride_lse_h + split * stride_lse_s, lse, mask=rmask)


# ----------------------------------------------------------------------------------------------------------------
# Checks and launch rules shared by the attention launchers (paged_prefill and shared_prefix_decode import them).

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, who: str) -> tuple[int, int, int]:
    """Validate q [*, Hq, D] against the caches [num_blocks, block_size, Hkv, D]; returns (block_size, Hkv, group)."""
    if k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"{who}: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dim() != 3:
        raise ValueError(f"{who}: q must be [tokens, num_heads, head_dim], got {tuple(q.shape)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"{who}: q head_dim {q.shape[2]} (q {tuple(q.shape)}) != cache head_dim {head_dim} "
                         f"(k_cache {tuple(k_cache.shape)})")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"{who}: num_heads {q.shape[1]} (q {tuple(q.shape)}) is not a multiple of num_kv_heads "
                         f"{num_kv_heads} (k_cache {tuple(k_cache.shape)})")
    if q.dtype not in ATTN_DTYPES:
        raise TypeError(f"{who}: q dtype {q.dtype} not supported; accepted: {ATTN_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{who}: q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if q.device != k_cache.device or v_cache.device != k_cache.device:
        raise ValueError(f"{who}: q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous in head_dim, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")
    return block_size, num_kv_heads, q.shape[1] // num_kv_heads


def check_index(name: str, t: torch.Tensor, dims: int, device: torch.device, who: str,
                rows: int | None = None) -> None:
    """An int32 index tensor (block table, lengths, offsets) with `dims` dims (and `rows` rows when given)."""
    if t.dtype != torch.int32:
        raise TypeError(f"{who}: {name} must be int32, got {t.dtype} (shape {tuple(t.shape)})")
    if t.dim() != dims or (rows is not None and t.shape[0] != rows):
        want = f"{dims} dims" + (f" with {rows} rows" if rows is not None else "")
        raise ValueError(f"{who}: {name} must have {want}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device}, q is on {device}")
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{who}: {name} must be contiguous in its last dim, got strides {t.stride()}")


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 on tensor cores by default; keep them exact so fp32 is a true reference dtype.
    return "ieee" if dtype == torch.float32 else "tf32"


def tile_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch constants shared by the attention kernels, by rule (unmeasured; checked for spills by
    tests/kernels/test_aot_compile.py): BLOCK_D the padded head dim (>= 16, tl.dot's minimum); BLOCK_N keys per
    tile so that one K or V tile is at most 16 KB in 16-bit dtypes (64 keys of 128 bf16). fp32 is the exact
    reference dtype (its ieee dot runs on FMA units, its tiles live in registers), so its tiles are 16 keys: at 64
    keys of 128 floats every fp32 kernel spilled on sm_90. Three pipeline stages in 16-bit dtypes: with the block
    ids loaded a tile ahead (attend_paged_range) Triton then double-buffers K and V (TTGIR: 2 x 64 x 128 buffers,
    async_wait 2); at two stages it kept one buffer and waited for every load (async_wait 0). fp32: two."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype.itemsize <= 2:
        block_n = 64 if block_d * dtype.itemsize <= 256 else 32
    else:
        block_n = 16
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "num_stages": 3 if dtype.itemsize <= 2 else 2}


def row_tile(rows: int, dtype: torch.dtype, cap: int, head_dim: int) -> int:
    """Query rows per program: the next power of two >= rows, at least 16 (tl.dot), at most `cap`; for fp32 inputs,
    whose FMA dot keeps [rows, keys] and [rows, head_dim] float tiles in registers, 16 rows: larger fp32 row tiles
    spill on sm_90 (tests/kernels/test_aot_compile.py). head_dim is kept for per-head-dim rules."""
    if dtype.itemsize > 2:
        cap = 16
    return min(cap, max(16, triton.next_power_of_2(rows)))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a token number that keeps the CPU grid small


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Resident CTAs per SM of the 16-bit decode kernels, by compute capability and head dim: compile-time facts read from
# benchmarks/results/aot_compile_sm90.json / _sm80.json (Triton 3.9; the cascade's at its 64-row tile), not tuned.
# The split rules fill one wave at this occupancy; other targets, fp32 and the interpreter fall back to 2.
RESIDENT_CTAS = {90: {"paged_decode": {64: 6, 128: 3}, "cascade_decode": {64: 3, 128: 2}},
                 80: {"paged_decode": {64: 4, 128: 2}, "cascade_decode": {64: 1, 128: 1}}}


def target_arch() -> int | None:
    """Compute capability Triton compiles for (the stub's under AOT compilation), None where there is none."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no driver (CPU interpreter): no arch-specific choice to make
        return None
    return target.arch if target.backend == "cuda" and isinstance(target.arch, int) else None


def resident_ctas(kernel: str, head_dim: int, dtype: torch.dtype, arch: int | None = None) -> int:
    """CTAs per SM of `kernel` at this head dim and dtype on `arch` (default: the current target); fallback 2."""
    if dtype.itemsize > 2:
        return 2
    arch = target_arch() if arch is None else arch
    return RESIDENT_CTAS.get(arch, {}).get(kernel, {}).get(head_dim, 2)


def num_splits_rule(programs: int, max_len: int, device: torch.device, sms: int | None = None,
                    ctas_per_sm: int = 2) -> int:
    """Splits along the keys so that programs x splits fills one wave at the kernel's occupancy (ctas_per_sm, from
    RESIDENT_CTAS; `sms` overrides the device's SM count: the traffic model), never splitting below
    MIN_SPLIT_TOKENS keys per split. Rule, not tuned (unmeasured)."""
    want = math.ceil(ctas_per_sm * (sms or num_sms(device)) / max(programs, 1))
    return max(1, min(want, math.ceil(max_len / MIN_SPLIT_TOKENS), 64))


def out_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None,
               who: str) -> torch.Tensor:
    """Allocate, or validate the caller's, output tensor of `shape` (contiguous in the last dim)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.stride(-1) != 1 or out.device != device:
        raise ValueError(f"{who}: out must be {tuple(shape)} on {device}, contiguous in the last dim; got "
                         f"{tuple(out.shape)} strides {out.stride()} on {out.device}")
    if out.dtype not in ATTN_DTYPES:
        raise TypeError(f"{who}: out dtype {out.dtype} not supported; accepted: {ATTN_DTYPES}")
    return out


def lse_buffer(shape: tuple[int, ...], device: torch.device, lse_out: torch.Tensor | None, who: str) -> torch.Tensor:
    """Allocate, or validate the caller's, float32 lse tensor of `shape`."""
    if lse_out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(lse_out.shape) != tuple(shape) or lse_out.dtype != torch.float32 or lse_out.device != device:
        raise ValueError(f"{who}: lse_out must be float32 {tuple(shape)} on {device}; got {lse_out.dtype} "
                         f"{tuple(lse_out.shape)} on {lse_out.device}")
    return lse_out


def paged_decode(*, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, max_seq_len: int | None = None, num_splits: int | None = None,
                 out: torch.Tensor | None = None,
                 lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [batch, num_heads, head_dim] over paged K/V.

    k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_dim] (q's dtype); block_tables int32
    [batch, max_blocks] (-1 padded); seq_lens int32 [batch] (0 allowed: empty state). `max_seq_len` (host int)
    only feeds the split rule; without it and without `num_splits` the launcher syncs to read seq_lens.max().
    Returns (out [batch, num_heads, head_dim] in `out`'s dtype (default q's), lse [batch, num_heads] float32,
    natural log, -inf for an empty sequence).
    """
    who = "paged_decode"
    block_size, num_kv_heads, group = check_kv_cache(q, k_cache, v_cache, who)
    batch, num_heads, head_dim = q.shape
    check_index("block_tables", block_tables, 2, q.device, who, rows=batch)
    check_index("seq_lens", seq_lens, 1, q.device, who, rows=batch)
    out = out_buffer((batch, num_heads, head_dim), q.dtype, q.device, out, who)
    lse_out = lse_buffer((batch, num_heads), q.device, lse_out, who)
    if batch == 0:
        return out, lse_out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        num_splits = num_splits_rule(batch * num_kv_heads, max_seq_len, q.device,
                                     ctas_per_sm=resident_ctas("paged_decode", head_dim, q.dtype))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{who}: num_splits must be a positive int, got {num_splits!r}")

    if num_splits == 1:  # write the final state directly
        part_out, part_lse = out.unsqueeze(2), lse_out.unsqueeze(2)
    else:  # [batch, num_heads, num_splits, head_dim] float32 partial states, reduced below
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
        scale * LOG2E, head_dim, group,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)), DOT_PREC=dot_precision(q.dtype),
        num_warps=4, **tile_config(head_dim, q.dtype),
    )
    if num_splits > 1:
        reduce_states(parts_out=part_out, parts_lse=part_lse, out=out, lse_out=lse_out)
    return out, lse_out
