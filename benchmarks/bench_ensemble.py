"""`prmkern verify --ensemble` on a slice of the bundled ProcessBench sets: each member's F1, the ensemble's, their
agreement, and the wall time.

The slice: from each of ../shared/data/processbench/{gsm8k,math}.json the first --per-kind records with an error and
the first --per-kind without one whose problem and steps fit in --max-chars characters (the shipped verifier has a
1,024-token context), with `subset` set to the file's name. Members are given as --ensemble takes them; the word
RANDOM_PRM in a member's model is replaced by a random-weight Qwen2ForProcessRewardModel built here
(prmkern.tiny.build_prm_checkpoint, as the tests build it: its scores are noise, it measures the machinery only).

    python benchmarks/bench_ensemble.py --ensemble prmkern:prmkern/data/verifier,qwen-prm:RANDOM_PRM \\
        --out benchmarks/results/ensemble_mixed_cpu.json

The last stdout line is one JSON document (bench_engine.emit_result).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_engine import emit_result, git_commit  # noqa: E402

PROCESSBENCH = os.path.join(ROOT, "..", "shared", "data", "processbench")


def write_slice(path: str, per_kind: int, max_chars: int) -> int:
    n = 0
    with open(path, "w") as out:
        for subset in ("gsm8k", "math"):
            with open(os.path.join(PROCESSBENCH, f"{subset}.json")) as f:
                data = json.load(f)
            short = [r for r in data if len(r["problem"]) + sum(map(len, r["steps"])) < max_chars]
            for r in [r for r in short if r["label"] >= 0][:per_kind] + [r for r in short if r["label"] == -1][:per_kind]:
                out.write(json.dumps({"id": r["id"], "problem": r["problem"], "steps": r["steps"], "label": r["label"],
                                      "subset": subset}) + "\n")
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ensemble", required=True)
    ap.add_argument("--combine", default="mean")
    ap.add_argument("--per-kind", type=int, default=3, help="records with / without an error per subset")
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--verify-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.ensemble
        if "RANDOM_PRM" in spec:
            from prmkern.tiny import build_prm_checkpoint
            spec = spec.replace("RANDOM_PRM", build_prm_checkpoint(os.path.join(tmp, "random-prm"), seed=0))
        src = os.path.join(tmp, "slice.jsonl")
        records = write_slice(src, args.per_kind, args.max_chars)
        summary = os.path.join(tmp, "summary.json")
        cmd = [sys.executable, "-m", "prmkern", "verify", src, "--ensemble", spec, "--combine", args.combine,
               "--chains", str(args.chains), "--max-tokens", str(args.max_tokens), "--verify-seed",
               str(args.verify_seed), "--threads", str(args.threads), "--no-chains", "--no-progress",
               "-o", os.path.join(tmp, "rows.jsonl"), "--summary", summary]
        load = os.getloadavg()
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        with open(summary) as f:
            s = json.load(f)
    m = s["ensemble_labels"]
    result = {"benchmark": "ensemble", "cpu": "AMD EPYC", "commit": git_commit(),
              "date": datetime.date.today().isoformat(), "load_before": [round(x, 2) for x in load],
              "load_after": [round(x, 2) for x in os.getloadavg()], "ensemble": args.ensemble,
              "args": vars(args), "records": records, "seconds": round(seconds, 2),
              "f1": {"ensemble": m["ensemble"]["mean_f1"], **{k: v["mean_f1"] for k, v in m["members"].items()}},
              "f1_per_subset": {"ensemble": {k: v["f1"] for k, v in m["ensemble"].items() if isinstance(v, dict)},
                                **{n: {k: v["f1"] for k, v in f.items() if isinstance(v, dict)}
                                   for n, f in m["members"].items()}},
              "agreement": m["agreement"], "engines": s["engines"]}
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
