"""Shared setup for the kernel tests: the Triton interpreter on machines without CUDA, random paged KV caches, and
float64 references written as plainly as possible (a Python loop per token to rebuild contiguous K/V from the block
table, then softmax(Q K^T) V in float64). The references know nothing of the kernels or of prmkern's backends.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported anywhere: the interpreter is chosen at import / decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances on attention outputs against the float64 reference, per input dtype. fp16 inputs are exact in the
# reference; the error comes from fp16 P in the P @ V product and the fp16 output rounding.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtype_params() -> list:
    """fp32 and fp16 everywhere; bf16 only on a GPU (the 3.9 interpreter's tl.dot on bf16 is wrong)."""
    bf16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a GPU"))
    return [torch.float32, torch.float16, bf16]


def make_paged_kv(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  seed: int = 0, spare_blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches with each sequence's blocks scattered at random physical ids; returns (k_cache, v_cache,
    block_tables int32 [len(lens), max_blocks] padded with -1). Unused slots hold NaN, so a kernel that reads past
    a sequence's length, or a block it does not own, poisons its output."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // block_size) for n in lens]
    total = sum(nblocks) + spare_blocks
    shape = (total, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    perm = torch.randperm(total, generator=g)
    tables = torch.full((len(lens), max(nblocks + [1])), -1, dtype=torch.int32)
    used = 0
    for s, (n, nb) in enumerate(zip(lens, nblocks)):
        ids = perm[used:used + nb]
        used += nb
        tables[s, :nb] = ids.to(torch.int32)
        for t in range(n):
            blk, off = int(ids[t // block_size]), t % block_size
            k_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)


def contiguous_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild one sequence's K/V [length, num_kv_heads, head_dim] float64, token by token from its table row."""
    block_size = k_cache.shape[1]
    ks, vs = [], []
    for t in range(length):
        blk = int(table_row[t // block_size])
        ks.append(k_cache[blk, t % block_size].double().cpu())
        vs.append(v_cache[blk, t % block_size].double().cpu())
    if not ks:
        empty = torch.zeros(0, k_cache.shape[2], k_cache.shape[3], dtype=torch.float64)
        return empty, empty.clone()
    return torch.stack(ks), torch.stack(vs)


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  q_pos: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [M, Hq, D], k/v [L, Hkv, D] -> (out [M, Hq, D] float64, lse [M, Hq] float64, natural log).
    q_pos: causal positions (query i sees keys 0..q_pos[i]); None = sees all keys. No key: out 0, lse -inf."""
    q, k, v = q.double().cpu(), k.double(), v.double()
    m, hq, d = q.shape
    group = hq // max(k.shape[1], 1)
    out = torch.zeros(m, hq, d, dtype=torch.float64)
    lse = torch.full((m, hq), float("-inf"), dtype=torch.float64)
    for i in range(m):
        n = k.shape[0] if q_pos is None else q_pos[i] + 1
        if n == 0:
            continue
        for h in range(hq):
            kh, vh = k[:n, h // group], v[:n, h // group]  # [n, D]
            s = (kh @ q[i, h]) * scale  # [n]
            lse[i, h] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ vh
    return out, lse


def ref_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lens: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row over its paged KV: (out [B, Hq, D], lse [B, Hq]) float64."""
    outs, lses = [], []
    for b, n in enumerate(lens):
        k, v = contiguous_kv(k_cache, v_cache, tables[b].cpu(), n)
        o, l = ref_attention(q[b:b + 1], k, v, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 scale: float = 1.0) -> None:
    """Compare against a float64 reference with the per-dtype tolerance (times `scale`); NaN never passes."""
    a = actual.double().cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in output (unwritten or poisoned element), shape {tuple(a.shape)}"
    torch.testing.assert_close(a, expected.double().cpu(), atol=ATOL[dtype] * scale, rtol=RTOL[dtype] * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_lse_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """lse is float32 whatever the input dtype; -inf must match exactly (empty ranges)."""
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in lse"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: -inf pattern differs: {a} vs {e}"
    fin = ~torch.isinf(e)
    torch.testing.assert_close(a[fin], e[fin], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def nan_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def make_cascade(groups: list[tuple[int, list[int]]], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int = 0) -> dict:
    """A decode batch of chain groups sharing prefixes. groups: [(prefix_blocks, [suffix_len per chain])].

    Returns the caches and every field of prmkern's DecodeMetadata as plain tensors / ints / lists (so kernel
    tests need no engine): the full per-chain block tables are the group's prefix blocks (the same physical ids
    for every chain of the group) followed by the chain's own suffix blocks."""
    seg_lens = [pb * block_size for pb, _ in groups] + [n for _, sfx in groups for n in sfx]
    k_cache, v_cache, seg_tables = make_paged_kv(seg_lens, block_size, num_kv_heads, head_dim, dtype, seed=seed)
    seg_tables = seg_tables.cpu()
    num_groups = len(groups)
    group_starts, prefix_lens, full_rows, suffix_rows, seq_lens, suffix_lens = [0], [], [], [], [], []
    chain = num_groups
    for g, (pb, sfx) in enumerate(groups):
        prefix_lens.append(pb * block_size)
        for n in sfx:
            nb = -(-n // block_size)
            full_rows.append(seg_tables[g, :pb].tolist() + seg_tables[chain, :nb].tolist())
            suffix_rows.append(seg_tables[chain, :nb].tolist())
            seq_lens.append(pb * block_size + n)
            suffix_lens.append(n)
            chain += 1
        group_starts.append(group_starts[-1] + len(sfx))

    def pad(rows: list[list[int]]) -> torch.Tensor:
        width = max([len(r) for r in rows] + [1])
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)

    i32 = dict(dtype=torch.int32, device=DEVICE)
    return dict(
        k_cache=k_cache, v_cache=v_cache,
        seq_lens=torch.tensor(seq_lens, **i32), block_tables=pad(full_rows),
        group_starts=torch.tensor(group_starts, **i32), prefix_lens=torch.tensor(prefix_lens, **i32),
        prefix_block_tables=pad([seg_tables[g, :pb].tolist() for g, (pb, _) in enumerate(groups)]),
        suffix_lens=torch.tensor(suffix_lens, **i32), suffix_block_tables=pad(suffix_rows),
        max_seq_len=max(seq_lens), max_prefix_len=max(prefix_lens), max_suffix_len=max(suffix_lens),
        group_starts_list=group_starts, prefix_lens_list=prefix_lens,
        seq_lens_list=seq_lens, max_group_size=max(len(sfx) for _, sfx in groups),
    )
