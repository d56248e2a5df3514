"""Micro-benchmark of the CPU sampler's draw: the C++ `_C.sample_rows` (csrc/sampling.cpp) against the torch path
(prmkern.engine.sampler._draw_torch: softmax, cumsum, two searchsorted), alternating in one process, on a decode step's
logit rows (R chains x a vocabulary: bench_engine's 32,000 and Qwen2's 151,936).

  python benchmarks/bench_cpu_sampler.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_engine import cpu_isa, emit_result, git_commit  # noqa: E402
from benchmarks.roofline import cpu_model  # noqa: E402
from prmkern.ops.cpp import cpp_ops  # noqa: E402
from prmkern.engine.sampler import _draw_torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="one tiny shape, one round")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = cpp_ops()
    if ops is None:
        raise SystemExit("prmkern._C is not built (scripts/setup_env.sh)")
    if args.smoke:
        args.rows, args.vocab, args.rounds, args.calls = [3], [1000], 1, 2
    rows_out = []
    for V in args.vocab:
        for R in args.rows:
            g = torch.Generator().manual_seed(R * V)
            logits = torch.randn(R, V, generator=g) * 3
            u = torch.rand(R, generator=g, dtype=torch.float64)
            ones = [1.0] * R
            variants = {"cpp": lambda: ops.sample_rows(logits, u),
                        "torch": lambda: _draw_torch(logits, u, ones, [0.0] * R, [0] * R, ones)}
            assert torch.equal(variants["cpp"]()[0], variants["torch"]()[0]), "the two draws disagree"
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    fn()
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - t) / args.calls)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(rows=R, vocab=V, cpp_ms=round(1e3 * med["cpp"], 4), torch_ms=round(1e3 * med["torch"], 4),
                       speedup=round(med["torch"] / med["cpp"], 2))
            rows_out.append(row)
            print(f"  R={R:3d} V={V:6d}  cpp {row['cpp_ms']:.3f} ms  torch {row['torch_ms']:.3f} ms  "
                  f"{row['speedup']:.2f}x")
    emit_result(dict(bench="cpu_sampler", device="cpu", cpu_model=cpu_model(), cpu_isa=cpu_isa(),
                     cpu_count=os.cpu_count(), threads=torch.get_num_threads(), commit=git_commit(),
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     smoke=args.smoke, rows=rows_out), args.out)


if __name__ == "__main__":
    main()
