"""Micro-benchmark of the C++ decode GEMMs (`prmkern._C.decode_linear`: on the checkpoint's [N, K] weight, "cpp",
and on its column-panel copy, "panels", csrc/panel_gemm.cpp; pair panels for bf16 x bf16 on an AVX-512 BF16 CPU)
against torch's `F.linear` (MKL / oneDNN) at decode row counts (and prefill's, with --rows 512), with the weights
either cached (one weight, called again and again) or streamed from memory (a ring of copies larger than the
last-level cache, as in a decode step, where every weight is read once).

Shapes: the bench_engine model's projections (hidden 512: qkv 768 x 512, gate_up 2816 x 512, down 512 x 1408, LM
head 32000 x 512) and ThinkPRM-1.5B's (hidden 1536: qkv 2048 x 1536, gate_up 17920 x 1536, down 1536 x 8960).
dtypes: fp32; bf16 weights with fp32 activations (widened in registers) and with bf16 activations (AVX-512 BF16
dot products where the CPU has them: `_C.bf16_dot()`). The instruction set is the process's own: compare levels by
running it under PRMKERN_ISA=avx2 (or =scalar). Variants of one shape alternate; medians are reported.

  python benchmarks/bench_cpu_gemm.py --threads 2
  PRMKERN_ISA=avx2 python benchmarks/bench_cpu_gemm.py --threads 2 --rows 16 --shapes 39M
  python benchmarks/bench_cpu_gemm.py --smoke      # tiny sizes, for CI
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import emit_result, git_commit  # noqa: E402  (one commit stamp for every result)
from benchmarks.roofline import cpu_model  # noqa: E402
from prmkern import _C  # noqa: E402
from prmkern.models.decode_panels import pack_pair_panels, pack_panels  # noqa: E402

SHAPES = {"39M": [("qkv", 768, 512), ("gate_up", 2816, 512), ("down", 512, 1408), ("lm_head", 32000, 512)],
          "1.5B": [("qkv", 2048, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)]}
STREAM_BYTES = 256 << 20  # a ring of weight copies this large: past any last-level cache of these machines


def timed(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def bench_shape(name: str, N: int, K: int, M: int, rounds: int, ring_bytes: int = STREAM_BYTES) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for wdtype, xdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16)):
        wbytes = N * K * torch.finfo(wdtype).bits // 8
        ring = [torch.randn(N, K, generator=g).to(wdtype) for _ in range(max(2, ring_bytes // wbytes))]
        pairs = wdtype == xdtype == torch.bfloat16 and _C.bf16_dot()  # what the runner packs for bf16 models
        panels = [pack_pair_panels(w) if pairs else pack_panels(w) for w in ring]
        x = torch.randn(M, K, generator=g).to(xdtype)
        it = {"i": 0}

        def streamed(f):
            def call():
                it["i"] = (it["i"] + 1) % len(ring)
                f(ring[it["i"]], panels[it["i"]])
            return call

        fns = {"cpp cached": lambda: _C.decode_linear(x, ring[0]),
               "cpp streamed": streamed(lambda w, p: _C.decode_linear(x, w)),
               "panels cached": lambda: _C.decode_linear(x, ring[0], None, panels[0]),
               "panels streamed": streamed(lambda w, p: _C.decode_linear(x, w, None, p))}
        if xdtype == wdtype:  # F.linear needs one dtype
            fns["torch cached"] = lambda: F.linear(x, ring[0])
            fns["torch streamed"] = streamed(lambda w, p: F.linear(x, w))
        calls = max(3, min(200, int(2e8 // (2 * M * N * K)) + 1))
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(timed(f, calls))
        for k, ts in times.items():
            t = statistics.median(ts)
            rows.append(dict(shape=name, N=N, K=K, M=M, weight=str(wdtype).replace("torch.", ""),
                             x=str(xdtype).replace("torch.", ""), variant=k, ms=round(t * 1e3, 4),
                             gflops=round(2 * M * N * K / t / 1e9, 1), weight_gbs=round(wbytes / t / 1e9, 1)))
            print(f"  {name:8s} {N:6d}x{K:<5d} M={M:<3d} w {rows[-1]['weight']:8s} x {rows[-1]['x']:8s} {k:15s} "
                  f"{t * 1e3:8.3f} ms {rows[-1]['gflops']:7.1f} GFLOP/s {rows[-1]['weight_gbs']:6.1f} GB/s of weights",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[16], help="activation rows (decode: running chains)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--smoke", action="store_true", help="one tiny shape, one round: keeps the script alive in CI")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"decode GEMM on {cpu_model()}: isa {_C.cpu_isa()}, bf16 dot products {_C.bf16_dot()}, "
          f"{args.threads} threads", flush=True)
    rows = []
    shapes = {"smoke": [("tiny", 68, 96)]} if args.smoke else {k: SHAPES[k] for k in args.shapes}
    for group, entries in shapes.items():
        for name, N, K in entries:
            for M in args.rows:
                rows += bench_shape(f"{group}.{name}", N, K, M, 1 if args.smoke else args.rounds,
                                    1 << 20 if args.smoke else STREAM_BYTES)
    commit = git_commit()
    result = dict(bench="cpu_gemm", cpu_model=cpu_model(), isa=_C.cpu_isa(), bf16_dot=_C.bf16_dot(),
                  threads=args.threads, smoke=args.smoke, commit=commit, date=datetime.datetime.now().astimezone().isoformat(
                      timespec="seconds"), rows=rows)
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
