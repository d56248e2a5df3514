"""bench_engine's `--roofline` section: the floors of one measured run and each engine's fraction of them.

Given the model's spec, the run's shape and the measured times, it measures this machine's ceilings now
(benchmarks/roofline.py: instruction peaks from csrc's micro-kernels, the best read bandwidth over a buffer the size
of a decode step's working set) and reports, for each prmkern engine, the prefill (measured prefill step vs its
floor), the decode step (the median step at the full chain count vs the floor at the middle step's context) and
the whole run; for the peers (vLLM, transformers) the whole run. A fraction is floor time / measured time, so 1.0
is the machine's limit: a fraction above 1 means the floor is wrong, and is listed under `exceeded` and printed.
Does not time anything itself but the ceilings.
"""
from __future__ import annotations

import sys

import torch

from benchmarks.roofline import ceilings, decode_step_floor, generation_floor, prefill_floor


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def roofline_report(spec, dtypes: dict[str, torch.dtype], engines_out: dict[str, dict], prompt_len: int, chains: int,
                    gen_len: int, threads: int) -> dict:
    """spec: the model's DecoderSpec; dtypes: engine name -> its dtype (peers: the run's dtype); engines_out: engine
    name -> {"seconds", and for prmkern engines "prefill_ms", "decode_step_ms"}. Prints a summary to stdout."""
    shared, own = prompt_len // 16 * 16, prompt_len % 16
    mid = own + gen_len / 2  # the middle decode step's own tokens per chain (a step's floor is linear in it)
    per_dtype: dict[torch.dtype, dict] = {}
    for dt in dict.fromkeys(dtypes.values()):
        working_set = decode_step_floor(spec, dt, chains, shared, mid, 1.0, 1.0)["bytes"]
        per_dtype[dt] = ceilings(dt, working_set, threads)
    first = next(iter(per_dtype.values()))
    out = dict(cpu_model=first["cpu_model"], cpu_isa=first["cpu_isa"], isa_flags=first["isa_flags"], threads=threads,
               peaks_gflops=first["peaks_gflops"], ceilings={str(dt).removeprefix("torch."): c
                                                             for dt, c in per_dtype.items()},
               engines={}, exceeded=[])
    print(f"  roofline ({first['cpu_model']}, kernels at {first['cpu_isa']}, {threads} threads): peaks "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in first["peaks_gflops"].items() if k != "per_core"))
    for name, row in engines_out.items():
        dt = dtypes[name]
        c = per_dtype[dt]
        bw, gf = c["bandwidth_gbs"], c["compute_gflops"]
        run = generation_floor(spec, dt, prompt_len, chains, gen_len, bw, gf)
        rep = dict(dtype=str(dt).removeprefix("torch."), bandwidth_gbs=bw, compute_gflops=gf,
                   compute_kind=c["compute_kind"], run=run, run_fraction=round(run["floor_s"] / row["seconds"], 3))
        if row.get("prefill_ms"):
            pre = prefill_floor(spec, dt, prompt_len, bw, gf)
            rep["prefill"] = dict(pre, measured_s=row["prefill_ms"] / 1e3,
                                  fraction=round(pre["floor_s"] / (row["prefill_ms"] / 1e3), 3))
        if row.get("decode_step_ms"):
            dec = decode_step_floor(spec, dt, chains, shared, mid, bw, gf)
            rep["decode_step"] = dict(dec, measured_s=row["decode_step_ms"] / 1e3,
                                      fraction=round(dec["floor_s"] / (row["decode_step_ms"] / 1e3), 3))
        out["engines"][name] = rep
        for part in ("prefill", "decode_step"):
            if part in rep and rep[part]["fraction"] > 1:
                out["exceeded"].append(f"{name} {part} {rep[part]['fraction']}")
        if rep["run_fraction"] > 1:
            out["exceeded"].append(f"{name} run {rep['run_fraction']}")
        pre_s = (f"prefill {_pct(rep['prefill']['fraction'])} of {1e3 * rep['prefill']['floor_s']:.3g} ms "
                 f"({rep['prefill']['bound']}), " if "prefill" in rep else "")
        dec_s = (f"decode step {_pct(rep['decode_step']['fraction'])} of {1e3 * rep['decode_step']['floor_s']:.3g} "
                 f"ms ({rep['decode_step']['bound']}), " if "decode_step" in rep else "")
        print(f"  {name:28s} {pre_s}{dec_s}run {_pct(rep['run_fraction'])} of {run['floor_s']:.3g} s "
              f"[{c['compute_kind']} {gf:.0f} GFLOP/s, read {bw:.1f} GB/s]")
    if out["exceeded"]:
        print(f"  FLOOR EXCEEDED (the floor is wrong, not the engine fast): {out['exceeded']}", file=sys.stderr)
    return out
