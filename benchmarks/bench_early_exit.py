"""--stop-at-first-error against a full run: the shipped verifier on its held-out examples and on the bundled
ProcessBench sample, the same Verifier settings and seeds, one after the other on one LLM. Prints per set the
generated tokens, seconds, predictions equal or not, stopped solutions and F1; the last stdout line is one JSON
document. Usage: python benchmarks/bench_early_exit.py [--chains 8] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

from prmkern import LLM
from prmkern.verify.processbench import processbench_f1, sample_path
from prmkern.verify.protocols import Verifier, VerifyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "prmkern", "data", "verifier")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    sets = {"heldout": os.path.join(SHIPPED, "examples.jsonl"), "processbench": str(sample_path())}
    llm = LLM(SHIPPED, device="cpu", dtype="float32", num_kvcache_blocks=4096)
    out = {"cpu": platform.processor() or platform.machine(), "chains": args.chains, "date": time.strftime("%F"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(), "sets": {}}
    for name, path in sets.items():
        recs = [json.loads(line) for line in open(path)][:args.limit]
        runs = {}
        for stop in (False, True):
            llm.reset_stats()
            t = time.perf_counter()
            res = Verifier(llm, VerifyConfig(format="prmkern", num_chains=args.chains,
                                             stop_at_first_error=stop)).verify(recs)
            runs[stop] = {"seconds": round(time.perf_counter() - t, 2), "tokens": llm.stats.generated_tokens,
                          "predictions": [r.prediction for r in res],
                          "stopped": sum(r.stopped_at is not None for r in res),
                          "f1": processbench_f1([r["label"] for r in recs], [r.prediction for r in res]).f1}
        full, stopped = runs[False], runs[True]
        row = {"solutions": len(recs), "full": full, "stop_at_first_error": stopped,
               "predictions_equal": full["predictions"] == stopped["predictions"],
               "tokens_saved": round(1 - stopped["tokens"] / full["tokens"], 4)}
        print(f"{name}: {full['tokens']} -> {stopped['tokens']} generated tokens ({row['tokens_saved']:.1%} saved), "
              f"{stopped['stopped']}/{len(recs)} stopped, predictions equal: {row['predictions_equal']}, "
              f"F1 {full['f1']:.3f} / {stopped['f1']:.3f}, {full['seconds']} s / {stopped['seconds']} s")
        out["sets"][name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
