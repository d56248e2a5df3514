"""The C++ elementwise kernels (csrc/elementwise.cpp, csrc/rotary_store.cpp) at every instruction-set level this
CPU runs, side by side: each level in its own subprocess (PRMKERN_ISA capped), alternated `--rounds` times, each
figure the best of its rounds (thread CPU time, one thread: the machine may be shared, and these ops run
single-threaded at decode sizes). Shapes: R1-Distill-Qwen-1.5B / ThinkPRM-1.5B (hidden 1536, intermediate 8960,
12 / 2 heads of 128) at 8 rows (a decode step of 8 chains) and 512 rows (a prefill chunk), bf16 and fp32.

Usage: python benchmarks/bench_isa_paths.py [--rounds 5] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
from prmkern import _C
torch.set_num_threads(1)
H, I, HQ, HKV, D = 1536, 8960, 12, 2, 128
out = {"isa": _C.cpu_isa()}

def best(fn, reps):
    fn()
    b = float("inf")
    for _ in range(reps):
        t = time.thread_time_ns(); fn(); b = min(b, time.thread_time_ns() - t)
    return b / 1e3  # us

for dtype in (torch.bfloat16, torch.float32):
    for rows in (8, 512):
        reps = 200 if rows == 8 else 20
        g = torch.Generator().manual_seed(0)
        x, r = (torch.randn(rows, H, generator=g).to(dtype) for _ in range(2))
        w = torch.rand(H, generator=g).to(dtype)
        gu = torch.randn(rows, 2 * I, generator=g).to(dtype)
        qkv = torch.randn(rows, (HQ + 2 * HKV) * D, generator=g).to(dtype)
        q, k, v = (a.reshape(rows, -1, D) for a in qkv.split([HQ * D, HKV * D, HKV * D], -1))
        cs = torch.randn(4096, D, generator=g)
        pos = torch.arange(rows)
        kc = torch.zeros(rows // 8 + 1, 8, HKV, D, dtype=dtype); vc = torch.zeros_like(kc)
        slots = torch.arange(rows)
        name = f"{str(dtype).split('.')[-1]}/rows={rows}"
        out[f"add_rms_norm/{name}"] = best(lambda: _C.add_rms_norm(x, r, w, 1e-6), reps)
        out[f"silu_and_mul/{name}"] = best(lambda: _C.silu_and_mul(gu), reps)
        out[f"rotary_store_kv/{name}"] = best(lambda: _C.rotary_store_kv(q, k, v, pos, cs, kc, vc, slots), reps)
print(json.dumps(out))
"""


def run_level(level: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if level:
        env["PRMKERN_ISA"] = level
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline import cpu_model
    from prmkern import _C
    levels = ["scalar", "avx2", "avx512"]
    levels = levels[:levels.index(_C.cpu_isa()) + 1]
    best: dict[str, dict[str, float]] = {lv: {} for lv in levels}
    for _ in range(args.rounds):
        for lv in levels:
            res = run_level(lv)
            assert res.pop("isa") == lv
            for k, us in res.items():
                best[lv][k] = min(us, best[lv].get(k, float("inf")))
    rows = []
    print(f"{'op/dtype/rows':42s}" + "".join(f"{lv + ' us':>12s}" for lv in levels) + "   scalar/widest")
    for k in best[levels[0]]:
        line = [best[lv][k] for lv in levels]
        rows.append(dict(op=k, **{lv: best[lv][k] for lv in levels}))
        print(f"{k:42s}" + "".join(f"{v:12.1f}" for v in line) + f"   {line[0] / line[-1]:.2f}x")
    if args.out:
        load = os.getloadavg()[0]
        args.out.write_text(json.dumps(dict(cpu=cpu_model(), isa=levels[-1], rounds=args.rounds, load=load,
                                            unit="us (best thread CPU time)", rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
