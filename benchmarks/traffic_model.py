"""A traffic model of the attention kernels: the bytes each decode step must move, its floor time, launches, CTAs.

For a kernel at a shape: the bytes it cannot avoid (KV read once, queries, outputs), the bytes its design adds
(partial states written and re-read by a split reduce, metadata), the floor time at a given DRAM bandwidth, the
number of launches and of CTAs (and CTAs per SM, from ptxas registers and shared memory via `occupancy`). The
benchmarks print it beside measured times (achieved GB/s, % of floor); tests/kernels/test_traffic_model.py asserts
its structural promises. It models the launchers' own split rules (imported from the kernels), so a change of
rule changes the model. It measures nothing: every figure here is arithmetic, not a timing.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability (RESIDENT_CTAS key)
    sms: int
    dram_gbps: float  # peak DRAM bandwidth, GB/s (datasheet)
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472  # bytes usable by CTAs on one SM (sm_90: 228 KB)
    smem_reserved_per_cta: int = 1024  # the driver reserves 1 KB of shared memory per CTA
    max_ctas_per_sm: int = 32
    max_warps_per_sm: int = 64


GPUS = {
    "H200": GPU("H200", arch=90, sms=132, dram_gbps=4800.0),  # 4.8 TB/s datasheet; ~4.3 TB/s reachable by copies
    "H100": GPU("H100", arch=90, sms=132, dram_gbps=3350.0),
    "A100": GPU("A100", arch=80, sms=108, dram_gbps=2039.0, smem_per_sm=167936),
}
REACHABLE = 0.9  # fraction of datasheet bandwidth a streaming copy reaches (rule of thumb; unmeasured here)


def occupancy(gpu: GPU, registers: int, num_warps: int, shared_bytes: int) -> int:
    """CTAs of one kernel resident per SM: limited by registers (allocated per warp in units of 256), shared memory,
    warps and the CTA slot count."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = gpu.smem_per_sm // (shared_bytes + gpu.smem_reserved_per_cta)
    by_warps = gpu.max_warps_per_sm // num_warps
    return max(0, min(by_regs, by_smem, by_warps, gpu.max_ctas_per_sm))


@dataclass(frozen=True)
class DecodeShape:
    """One decode step of one attention layer: `groups` groups of `chains` chains each sharing `prefix_len` keys,
    each chain with `suffix_len` keys of its own. Defaults: R1-Distill-Qwen-1.5B (ThinkPRM-1.5B), bf16."""
    prefix_len: int
    chains: int
    suffix_len: int
    groups: int = 1
    num_heads: int = 12
    num_kv_heads: int = 2
    head_dim: int = 128
    itemsize: int = 2
    block_size: int = 16

    @property
    def batch(self) -> int:
        return self.groups * self.chains

    @property
    def gqa(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes(self, tokens: int) -> int:
        """K + V of `tokens` keys, all KV heads."""
        return tokens * self.num_kv_heads * self.head_dim * 2 * self.itemsize


def _io_bytes(s: DecodeShape) -> int:
    """Queries read + outputs written (q's dtype) + lse written (float32)."""
    return s.batch * s.num_heads * (2 * s.head_dim * s.itemsize + 4)


def _state_bytes(rows: int, slots: int, head_dim: int) -> int:
    """float32 partial states (out [head_dim] + lse) of `rows` query rows x `slots` splits."""
    return rows * slots * (head_dim * 4 + 4)


def _table_bytes(rows: int, tokens: int, block_size: int) -> int:
    return rows * math.ceil(tokens / block_size) * 4


def _finish(name: str, s: DecodeShape, gpu: GPU, *, kv: int, state_written: int, state_read: int, tables: int,
            launches: int, ctas: int) -> dict:
    io = _io_bytes(s)
    total = kv + state_written + state_read + tables + io
    unique_kv = s.kv_bytes(s.groups * s.prefix_len + s.batch * s.suffix_len)
    bw = gpu.dram_gbps * REACHABLE * 1e9
    return {"kernel": name, "gpu": gpu.name, **asdict(s), "kv_bytes": kv, "unique_kv_bytes": unique_kv,
            "state_bytes_written": state_written, "state_bytes_read": state_read, "table_bytes": tables,
            "io_bytes": io, "total_bytes": total, "bytes_over_unique_kv": round(total / unique_kv, 3),
            "state_over_kv": round(state_written / kv, 4) if kv else 0.0,
            "floor_us": round(total / bw * 1e6, 2), "unique_floor_us": round(unique_kv / bw * 1e6, 2),
            "launches": launches, "ctas": ctas, "ctas_per_sm_launched": round(ctas / gpu.sms, 2)}


def cascade_fused(s: DecodeShape, gpu: GPU = GPUS["H200"]) -> dict:
    """kernels/cascade_decode.py: one launch; prefix once per group, suffixes once; P + S float32 states per row
    written once and read once by the row's last arriver (L2-resident in practice: counted anyway)."""
    from prmkern.kernels.cascade_decode import cascade_splits
    from prmkern.kernels.paged_decode import resident_ctas, row_tile
    import torch
    dtype = {2: torch.bfloat16, 4: torch.float32}[s.itemsize]
    block_m = row_tile(s.chains * s.gqa, dtype, cap=64, head_dim=s.head_dim)
    row_tiles = math.ceil(s.chains * s.gqa / block_m)
    p, q = cascade_splits(batch=s.batch, num_groups=s.groups, num_kv_heads=s.num_kv_heads, group=s.gqa,
                          head_dim=s.head_dim, itemsize=s.itemsize, row_tiles=row_tiles, max_prefix_len=s.prefix_len,
                          max_suffix_len=s.suffix_len, sms=gpu.sms,
                          ctas_per_sm=resident_ctas("cascade_decode", s.head_dim, dtype, arch=gpu.arch))
    state = _state_bytes(s.batch * s.num_heads, p + q, s.head_dim)
    tables = _table_bytes(s.groups, s.prefix_len, s.block_size) + _table_bytes(s.batch, s.suffix_len, s.block_size)
    ctas = s.groups * s.num_kv_heads * row_tiles * p + s.batch * s.num_kv_heads * q
    row = _finish("cascade_decode (fused)", s, gpu, kv=s.kv_bytes(s.groups * s.prefix_len + s.batch * s.suffix_len),
                  state_written=state, state_read=state, tables=tables, launches=1, ctas=ctas)
    return {**row, "prefix_splits": p, "suffix_splits": q, "block_m": block_m}


def cascade_three_launches(s: DecodeShape, gpu: GPU = GPUS["H200"]) -> dict:
    """The previous design: shared_prefix_decode (+ its reduce) + paged_decode on suffixes (+ its reduce) + merge,
    with the old rule (prefix splits for two waves of groups x KV heads x 128-row tiles)."""
    from prmkern.kernels.paged_decode import MIN_SPLIT_TOKENS

    def rule(programs: int, max_len: int) -> int:
        return max(1, min(math.ceil(2 * gpu.sms / max(programs, 1)), math.ceil(max_len / MIN_SPLIT_TOKENS), 64))
    rows = s.batch * s.num_heads
    tiles = math.ceil(s.chains * s.gqa / 128)
    p = rule(s.groups * s.num_kv_heads * tiles, s.prefix_len)
    q = rule(s.batch * s.num_kv_heads, s.suffix_len)
    state_w = _state_bytes(rows, p, s.head_dim) * (p > 1) + _state_bytes(rows, q, s.head_dim) * (q > 1) \
        + 2 * _state_bytes(rows, 1, s.head_dim)  # two float32 reduced states for the merge
    tables = _table_bytes(s.groups, s.prefix_len, s.block_size) + _table_bytes(s.batch, s.suffix_len, s.block_size)
    launches = 3 + (p > 1) + (q > 1)
    ctas = s.groups * s.num_kv_heads * tiles * p + s.batch * s.num_kv_heads * q + (launches - 2) * s.batch
    row = _finish("shared_prefix + paged + merge (3-5 launches)", s, gpu,
                  kv=s.kv_bytes(s.groups * s.prefix_len + s.batch * s.suffix_len), state_written=state_w,
                  state_read=state_w, tables=tables, launches=launches, ctas=ctas)
    return {**row, "prefix_splits": p, "suffix_splits": q}


def paged_unshared(s: DecodeShape, gpu: GPU = GPUS["H200"]) -> dict:
    """paged_decode over each chain's full KV (no sharing: the prefix read once per chain)."""
    from prmkern.kernels.paged_decode import num_splits_rule, resident_ctas
    import torch
    dtype = {2: torch.bfloat16, 4: torch.float32}[s.itemsize]
    n = s.prefix_len + s.suffix_len
    p = num_splits_rule(s.batch * s.num_kv_heads, n, torch.device("cpu"), sms=gpu.sms,
                        ctas_per_sm=resident_ctas("paged_decode", s.head_dim, dtype, arch=gpu.arch))
    state = _state_bytes(s.batch * s.num_heads, p, s.head_dim) if p > 1 else 0
    return {**_finish("paged_decode (unshared)", s, gpu, kv=s.kv_bytes(s.batch * n), state_written=state,
                      state_read=state, tables=_table_bytes(s.batch, n, s.block_size), launches=1 + (p > 1),
                      ctas=s.batch * s.num_kv_heads * p + (s.batch if p > 1 else 0)), "splits": p}


def paged_decode_model(batch: int, seq_len: int, *, num_heads: int = 12, num_kv_heads: int = 2, head_dim: int = 128,
                       itemsize: int = 2, gpu: GPU = GPUS["H200"]) -> dict:
    """paged_decode at `batch` sequences of `seq_len` keys (bench_paged_decode's shapes)."""
    return paged_unshared(DecodeShape(prefix_len=0, chains=batch, suffix_len=seq_len, num_heads=num_heads,
                                      num_kv_heads=num_kv_heads, head_dim=head_dim, itemsize=itemsize), gpu)


def achieved(model: dict, measured_ms: float) -> dict:
    """Achieved bandwidth over the model's bytes and the fraction of the floor reached by a measured time."""
    return {"achieved_gbps": round(model["total_bytes"] / (measured_ms * 1e-3) / 1e9, 1),
            "pct_of_floor": round(100.0 * model["floor_us"] / (measured_ms * 1e3), 1)}


def report(shapes: list[DecodeShape], gpu: GPU = GPUS["H200"]) -> list[dict]:
    return [m(s, gpu) for s in shapes for m in (cascade_fused, cascade_three_launches, paged_unshared)]


GOAL = DecodeShape(prefix_len=8192, chains=64, suffix_len=256)

if __name__ == "__main__":
    import json
    for r in report([GOAL, DecodeShape(2048, 32, 256), DecodeShape(512, 8, 64)]):
        print(json.dumps({k: r[k] for k in ("kernel", "prefix_len", "chains", "suffix_len", "total_bytes",
                                            "bytes_over_unique_kv", "state_over_kv", "floor_us", "launches", "ctas")}))
