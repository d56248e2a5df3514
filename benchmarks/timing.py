"""The one timing helper every kernel benchmark uses, and the plumbing they share (args, ceilings, results).

On a GPU: CUDA events around each call, warm-up first, the median of many runs, and the inputs rotated over several
copies so that their total exceeds the L2 cache (a kernel that re-reads the same small inputs every run would be
timed from L2, not from memory). Ceilings are measured in the same run, on the same device: a large device-to-device
copy (GB/s, counting read + write) and a large bf16 matmul (TFLOP/s); kernels are reported against them.
On the CPU (the `--smoke` runs under TRITON_INTERPRET=1) it falls back to time.perf_counter: those numbers only prove
the harness runs end to end, they measure nothing.
Does not decide what to benchmark: each bench_<kernel>.py builds its inputs and peers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The benchmarks' common flags; `extra(parser)` adds a benchmark's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="a short sweep (the goal shapes and a few around them): for a GPU session with little time")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, end to end (on a CPU under the Triton interpreter): keeps the harness alive in CI")
    p.add_argument("--out", nargs="?", const="", default=None,
                   help="write the JSON result under benchmarks/results/ (or to the path given)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 100, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10, smoke 1)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.reps = args.reps or (2 if args.smoke else 30 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5 if args.quick else 10)
    return args


def import_kernels(smoke: bool):
    """The kernels package from this checkout. Without CUDA only --smoke can run, under the interpreter (which
    must be chosen before triton is imported)."""
    if not torch.cuda.is_available():
        if not smoke:
            sys.exit("no CUDA device: the full benchmark needs a GPU; run with --smoke to check the harness on CPU")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import prmkern.kernels
    return prmkern.kernels


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def l2_bytes() -> int:
    if torch.cuda.is_available():
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 64 << 20)
    return 32 << 20


def num_copies(bytes_per_copy: int, budget_bytes: int = 16 << 30, smoke: bool = False) -> int:
    """How many input copies to rotate over so that together they exceed 3x L2, within a memory budget."""
    if smoke:
        return 2
    want = math.ceil(3 * l2_bytes() / max(bytes_per_copy, 1))
    return max(1, min(want, 64, budget_bytes // max(bytes_per_copy, 1)))


def time_fn(fn: Callable[[int], Any], copies: int = 1, reps: int = 100, warmup: int = 10) -> dict[str, float]:
    """Time fn(i) (i = which input copy to use, rotating over `copies`); returns milliseconds: median, min, p90."""
    for i in range(warmup):
        fn(i % copies)
    sync()
    times = []
    if torch.cuda.is_available():
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i % copies)
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % copies)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}


def measure_ceilings(smoke: bool, reps: int, warmup: int) -> dict[str, float]:
    """Measured ceilings on this device: copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s."""
    dev = device()
    nbytes = (1 << 20) if smoke else (2 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), reps=reps, warmup=warmup)
    copy_gbps = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    n = 256 if smoke else 8192
    mm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=mm_dtype, device=dev)
    b = torch.randn(n, n, dtype=mm_dtype, device=dev)
    t = time_fn(lambda i: a @ b, reps=reps, warmup=warmup)
    tflops = 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12
    return {"copy_gbps": sig(copy_gbps), "copy_bytes": nbytes, "matmul_tflops": sig(tflops),
            "matmul_n": n, "matmul_dtype": str(mm_dtype).replace("torch.", "")}


def device_info() -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                            "python": platform.python_version(),
                            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_bytes=l2_bytes(), capability=f"{props.major}.{props.minor}")
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (CPU smoke numbers are tiny; rounding to decimals would zero them)."""
    return float(f"{x:.{digits}g}")


def rate(bytes_moved: float, flops: float, ms: float, ceilings: dict[str, float]) -> dict[str, float]:
    """Achieved GB/s and TFLOP/s for one timing, and their fractions of the measured ceilings."""
    s = ms * 1e-3
    gbps = bytes_moved / s / 1e9
    tflops = flops / s / 1e12
    return {"gbps": sig(gbps), "frac_copy_bw": sig(gbps / ceilings["copy_gbps"], 3),
            "tflops": sig(tflops), "frac_matmul": sig(tflops / ceilings["matmul_tflops"], 3)}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def finish(name: str, args: argparse.Namespace, ceilings: dict[str, float], config: dict[str, Any],
           rows: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble the result document; write it with --out; print it as the last stdout line (compact JSON)."""
    doc = {"bench": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "device": device_info(), "smoke": bool(args.smoke), "ceilings": ceilings,
           "config": config, "summary": summary or {}, "rows": rows}
    if args.out is not None:
        path = Path(args.out) if args.out else RESULTS / (
            f"{name}{'_smoke' if args.smoke else ''}_{(doc['device'].get('gpu') or 'cpu').replace(' ', '_')}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    print(json.dumps(doc, separators=(",", ":")))
    return doc
