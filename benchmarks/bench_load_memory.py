"""Peak resident memory of loading a checkpoint, against the weights' bytes.

Each measurement runs in a fresh interpreter: it imports torch and prmkern, reads its resident set (VmRSS), loads
the checkpoint (prmkern.models.load_model, or with --engine the whole LLM, packed CPU weights included), and reads
the peak resident set (VmHWM, Linux). Reported: the weights' bytes (the tensors in the safetensors files), the
peak, `peak_over_weights` (the issue's measure: the whole process's peak / the weights) and
`load_over_weights` ((peak - the resident set before loading) / the weights: what loading itself adds, the measure
that still means something for a small checkpoint, where the interpreter and torch dominate).

  python benchmarks/bench_load_memory.py --shape r1-distill-qwen-1.5b     # the random 1.5B bf16 checkpoint
  python benchmarks/bench_load_memory.py --model DIR --dtype bfloat16 --engine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[5])  # this checkout's prmkern
import torch
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
path, dtype, engine, warm = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
from prmkern import LLM
from prmkern.models import load_model
if warm:  # a first, small load pays the one-time costs (modules imported on first use, allocator pools)
    load_model(warm, dtype, "cpu")
before = status("VmRSS")
if engine:
    LLM(path, dtype=dtype, device="cpu")
else:
    load_model(path, dtype, "cpu")
print(json.dumps(dict(rss_before=before, peak_rss=status("VmHWM"), rss_after=status("VmRSS"))))
"""


def weights_bytes(path: str) -> int:
    from prmkern.models.loader import _safetensors_files
    from prmkern.models.safetensors_reader import tensor_refs
    return sum(r.nbytes for f in _safetensors_files(path) for r in tensor_refs(f))


def measure(path: str, dtype: str = "bfloat16", engine: bool = False, threads: int = 2, warm: str = "") -> dict:
    """Loads `path` in a fresh interpreter and returns the peak resident memory against the weights' bytes; with
    `warm` (a small checkpoint) loaded first, before the resident set is read (what loading adds per byte then
    excludes the one-time costs)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", CHILD, path, dtype, "1" if engine else "0", warm, REPO],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    w = weights_bytes(path)
    return dict(r, weights_bytes=w, dtype=dtype, engine=engine, warm=bool(warm), peak_over_weights=round(r["peak_rss"] / w, 3),
                load_over_weights=round((r["peak_rss"] - r["rss_before"]) / w, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="a bench_engine --shape (its cached random checkpoint)")
    ap.add_argument("--model", default=None, help="a checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine", action="store_true", help="also construct the whole LLM (packed weights included)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from benchmarks.bench_engine import emit_result, git_commit, shape_checkpoint
    from benchmarks.roofline import cpu_model
    if bool(args.shape) == bool(args.model):
        raise SystemExit("give one of --shape NAME or --model DIR")
    path = args.model or shape_checkpoint(args.shape, args.dtype)
    rows = [measure(path, args.dtype, engine=False)] + ([measure(path, args.dtype, engine=True)] if args.engine else [])
    for r in rows:
        print(f"  {'LLM(...)' if r['engine'] else 'load_model'}: weights {r['weights_bytes'] / 2**30:.2f} GiB, peak RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB ({r['peak_over_weights']:.2f}x the weights; loading added "
              f"{r['load_over_weights']:.2f}x)", file=sys.stderr)
    doc = dict(bench="load_memory", model=args.shape or args.model, cpu_model=cpu_model(), commit=git_commit(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows)
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
