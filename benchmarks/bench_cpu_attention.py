"""Micro-benchmark of the C++ CPU attention layers: the cascade decode (`_C.cascade_decode`), the fused rotary + KV
store (`_C.rotary_store_kv`) and the causal prefill (`_C.prefill_attention`, against the torch backend's SDPA per
sequence), per layer, variants alternating in one process.

Shapes: the bench_engine model (Hq=8, Hkv=2, D=64; 16 chains sharing P=512 tokens, and a wider group: 32 chains
sharing P=2048) and ThinkPRM-1.5B /
R1-Distill-Qwen-1.5B (Hq=12, Hkv=2, D=128; 8 chains sharing P=1024), each chain with its own --suffix tokens,
fp32 and bf16 caches. Attention variants: the kernel's own instruction-set paths (avx512 / avx2 / scalar, where
the CPU has them) and, with --old-module, another build of prmkern._C (e.g. an older commit's csrc/ built by
torch.utils.cpp_extension.load into a .so), whose cascade_decode takes the same arguments. Rotary + store: the
C++ pass against the torch backend's apply_rotary + store_kv. Prefill: one fresh prompt of each shape's prefix
length, fp32 / bf16 caches. The machine may be shared: every variant runs
once per round, rounds alternate, and medians are reported with the ratio to the first variant.

  python benchmarks/bench_cpu_attention.py --threads 2
  python benchmarks/bench_cpu_attention.py --threads 2 --old-module /tmp/attn_old/prmkern_old_C.so
"""
from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import emit_result, git_commit  # noqa: E402  (one commit stamp for every result)
from benchmarks.roofline import cpu_model  # noqa: E402
from prmkern import _C  # noqa: E402
from prmkern.attention.metadata import PrefillMetadata  # noqa: E402
from prmkern.attention.torch_backend import TorchBackend  # noqa: E402

SHAPES = {"bench-39M": dict(hq=8, hkv=2, d=64, prefix=512, chains=16),
          "bench-39M-P2048": dict(hq=8, hkv=2, d=64, prefix=2048, chains=32),
          "1.5B": dict(hq=12, hkv=2, d=128, prefix=1024, chains=8)}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path).split(".")[0], path,
                                                  loader=importlib.machinery.ExtensionFileLoader(
                                                      os.path.basename(path).split(".")[0], path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cascade_batch(hq, hkv, d, prefix, chains, suffix, dtype, block_size=16, seed=0):
    """One group of `chains` sharing `prefix` tokens, each with `suffix` own tokens; blocks at shuffled ids."""
    g = torch.Generator().manual_seed(seed)
    pb, sb = -(-prefix // block_size), -(-suffix // block_size)
    nblocks = pb + chains * sb + 1
    perm = torch.randperm(nblocks, generator=g).to(torch.int32)
    k = torch.randn(nblocks, block_size, hkv, d, generator=g).to(dtype)
    v = torch.randn(nblocks, block_size, hkv, d, generator=g).to(dtype)
    meta = dict(group_starts=torch.tensor([0, chains], dtype=torch.int32),
                prefix_lens=torch.tensor([prefix], dtype=torch.int32),
                prefix_tables=perm[:pb][None].contiguous(),
                suffix_lens=torch.full((chains,), suffix, dtype=torch.int32),
                suffix_tables=perm[pb:pb + chains * sb].reshape(chains, sb).contiguous())
    q = torch.randn(chains, hq, d, generator=g)
    return q, k, v, meta


def alternate(fns: dict, rounds: int, calls: int) -> dict:
    """Median per-call ms of each variant, variants interleaved round by round."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_attention(args, old) -> list[dict]:
    isas = [i for i in ("avx512", "avx2", "scalar") if i == "scalar" or _C.cpu_isa() in (i, "avx512")]
    rows = []
    for shape, s in SHAPES.items():
        if args.shapes and shape not in args.shapes.split(","):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, m = cascade_batch(s["hq"], s["hkv"], s["d"], s["prefix"], s["chains"], args.suffix, dtype)
            a = (q, k, v, m["group_starts"], m["prefix_lens"], m["prefix_tables"], m["suffix_lens"],
                 m["suffix_tables"], s["d"] ** -0.5)
            fns = {}
            if old is not None:
                fns["old"] = lambda: old.cascade_decode(*a)
            for isa in isas:
                if isa == "scalar" and not args.scalar:
                    continue
                fns[isa] = (lambda i: lambda: _C.cascade_decode(*a, isa=i))(isa)
            ms = alternate(fns, args.rounds, args.calls)
            keys = s["prefix"] + args.suffix
            flops = 4 * s["chains"] * s["hq"] * s["d"] * keys  # QK^T and P V, every chain x head over all keys
            first = next(iter(ms))
            for name, t in ms.items():
                rows.append(dict(op="cascade_decode", shape=shape, dtype=str(dtype).replace("torch.", ""),
                                 variant=name, ms=round(t, 4), gflops=round(flops / t / 1e6, 1),
                                 vs_first=round(ms[first] / t, 2)))
    return rows


def bench_rotary_store(args) -> list[dict]:
    rows = []
    tb = TorchBackend()
    for shape, s in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            t, hq, hkv, d = s["chains"], s["hq"], s["hkv"], s["d"]
            qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
            q, kk, vv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q, kk, vv = q.reshape(t, hq, d), kk.reshape(t, hkv, d), vv.reshape(t, hkv, d)
            cache = torch.randn(4096, d)
            pos = torch.randint(0, 4096, (t,))
            kc = torch.zeros(64, 16, hkv, d, dtype=dtype)
            vc = torch.zeros_like(kc)
            slots = torch.randperm(64 * 16)[:t]

            def torch_path():
                tb._rope_rows = None  # the engine reuses the step's cos/sin rows across layers; so do both sides
                q2, k2 = tb.apply_rotary(q, kk, pos, cache)
                tb.store_kv(k2, vv, kc, vc, slots, True)

            fns = {"cpp": lambda: _C.rotary_store_kv(q, kk, vv, pos, cache, kc, vc, slots), "torch": torch_path}
            ms = alternate(fns, args.rounds, args.calls)
            for name, ti in ms.items():
                rows.append(dict(op="rotary+store_kv", shape=shape, dtype=str(dtype).replace("torch.", ""),
                                 variant=name, ms=round(ti, 4), vs_first=round(ms["cpp"] / ti, 2)))
    return rows


def bench_prefill(args) -> list[dict]:
    """One fresh prompt of `prefix` tokens per shape: the C++ causal prefill against the torch backend's path
    (gather of K/V and a causal SDPA), FLOPs counted for the causal half only."""
    rows = []
    tb = TorchBackend()
    for shape, s in SHAPES.items():
        if args.shapes and shape not in args.shapes.split(","):
            continue
        L, hq, hkv, d, bs = s["prefix"], s["hq"], s["hkv"], s["d"], 16
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(L)
            kc = torch.randn(L // bs, bs, hkv, d, generator=g).to(dtype)
            vc = torch.randn(L // bs, bs, hkv, d, generator=g).to(dtype)
            q = torch.randn(L, hq, d, generator=g).to(dtype)
            table = torch.randperm(L // bs, generator=g).to(torch.int32)[None]
            cu, lens = torch.tensor([0, L], dtype=torch.int32), torch.tensor([L], dtype=torch.int32)
            meta = PrefillMetadata(cu_seqlens_q=cu, seq_lens=lens, block_tables=table, max_q_len=L, max_seq_len=L)
            fns = {"cpp": lambda: _C.prefill_attention(q, kc, vc, cu, lens, table, d ** -0.5),
                   "torch": lambda: tb.prefill(q, kc, vc, meta, d ** -0.5)}
            ms = alternate(fns, max(3, args.rounds // 3), max(1, args.calls // 10))
            flops = 4 * hq * d * L * (L + 1) / 2
            for name, t in ms.items():
                rows.append(dict(op="prefill_attention", shape=shape, dtype=str(dtype).replace("torch.", ""),
                                 variant=name, ms=round(t, 4), gflops=round(flops / t / 1e6, 1),
                                 vs_first=round(ms["cpp"] / t, 2)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suffix", type=int, default=32, help="own tokens per chain")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--old-module", default=None, help="path of another prmkern._C build (.so) to compare")
    ap.add_argument("--scalar", action="store_true", help="also time the portable path")
    ap.add_argument("--skip-rotary", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--shapes", default="", help="comma-separated subset of " + ", ".join(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = load_module(args.old_module) if args.old_module else None
    rows = bench_attention(args, old)
    if not args.skip_rotary and hasattr(_C, "rotary_store_kv"):
        rows += bench_rotary_store(args)
    if not args.skip_prefill and hasattr(_C, "prefill_attention"):
        rows += bench_prefill(args)
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    emit_result(dict(bench="cpu_attention", cpu_model=cpu_model(), isa=_C.cpu_isa(), threads=args.threads,
                     suffix=args.suffix, commit=git_commit(),
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows),
                args.out)


if __name__ == "__main__":
    main()
