"""F1 against generated tokens for fixed K = 1, 2, 4, 8, 16 chains and for the adaptive chain count
(prmkern/verify/adaptive.py), with the shipped verifier (prmkern/data/verifier, format prmkern, fp32, CPU).

Sets: the bundled held-out examples (`prmkern verify`'s default input) and ProcessBench gsm8k / math from
/work/shared/data/processbench (a label-balanced slice: `--processbench-limit` records per subset, half with an
error, processbench.balanced_limit, as `eval processbench --limit` takes them).

How: one K=16 run per set (`Verifier(llm, VerifyConfig(format="prmkern", num_chains=16)).verify(records)`, seed 0,
all records in one call). Chain k of a record samples with chain k's seed whatever K is (SamplingParams.first_chain
and the engine's per-chain RNG), so the fixed-K rows take the first K chains of each record and aggregate them with
the Verifier's own code (scoring.aggregate); the script checks that on `--check-records` records against separate
K=4 and K=8 runs (token ids and predictions equal) and records the outcome. The adaptive rows are real runs
(`VerifyConfig(chains_min=M, chains_max=16, chains_risk=D)`); the same rule replayed on the K=16 run's chains
(`simulated`) gives a grid of (M, D), and the script checks that replay against each real run (chains run and
predictions equal). F1 is processbench.evaluate_subsets (what `verify` / `eval processbench` report); generated
tokens are the chains' generated tokens. Writes benchmarks/results/adaptive_chains.json and
docs/img/adaptive_chains.png; the last stdout line is the JSON summary.

    PYTHONPATH=$PWD python benchmarks/bench_adaptive_chains.py [--processbench-limit 100] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prmkern import LLM  # noqa: E402
from prmkern.verify.adaptive import flip_risk, next_total  # noqa: E402
from prmkern.verify.processbench import balanced_limit, evaluate_subsets, load_processbench  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402
from prmkern.verify.scoring import aggregate  # noqa: E402

FIXED = (1, 2, 4, 8, 16)
KMAX = 16
REAL = ((2, 16, 0.05), (2, 8, 0.05))  # (chains_min, chains_max, chains_risk) run for real (default of --real)
# replayed on the K=16 chains
GRID = [(m, k, d) for k in (8, 16) for m in (1, 2, 4) for d in (0.01, 0.02, 0.05, 0.1, 0.2)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def f1_of(records: list[dict], preds: list) -> dict:
    subsets: dict[str, tuple[list, list]] = {}
    for rec, p in zip(records, preds):
        labels, ps = subsets.setdefault(rec.get("subset", "all"), ([], []))
        labels.append(rec["label"])
        ps.append(p)
    out = evaluate_subsets(subsets)
    nan = lambda x: None if x != x else x  # noqa: E731 - an undefined F1 (both accuracies 0) is null in JSON
    return {"mean_f1": nan(out["mean_f1"]), **{k: nan(v.f1) for k, v in out.items() if k != "mean_f1"},
            **{f"{k}_acc_err": v.acc_err for k, v in out.items() if k != "mean_f1"},
            **{f"{k}_acc_ok": v.acc_ok for k, v in out.items() if k != "mean_f1"}}


def by_subset(records: list[dict], toks) -> dict:
    out: dict[str, int] = {}
    for rec, t in zip(records, toks):
        out[rec.get("subset", "all")] = out.get(rec.get("subset", "all"), 0) + t
    return out


def tokens_of(chains) -> int:
    return sum(len(t.token_ids) for c in chains for t in c.turns)


def first_k(res, k: int, threshold: float, method: str):
    """(prediction, tokens) of the first k chains of a K=16 result, aggregated as a fixed k-chain run would."""
    ag = aggregate([c.scores for c in res.chains[:k]], res.num_steps, method=method, threshold=threshold)
    return ag.earliest_error, tokens_of(res.chains[:k])


def replay(res, m: int, kmax: int, risk: float, threshold: float, method: str):
    """The adaptive rule on the first chains of a K=16 result: (chains run, prediction, tokens)."""
    n = m
    while True:
        ag = aggregate([c.scores for c in res.chains[:n]], res.num_steps, method=method, threshold=threshold)
        values = [[v.p_correct for v in c.scores.steps] for c in res.chains[:n]]
        r = flip_risk(values, [s.score for s in ag.steps], ag.earliest_error, threshold, kmax)
        if n >= kmax or r <= risk:
            return n, ag.earliest_error, tokens_of(res.chains[:n])
        n = next_total(n, kmax)


def run_set(llm, name: str, records: list[dict], check: int, real=REAL) -> dict:
    base = VerifyConfig(format="prmkern", num_chains=KMAX, seed=0)
    t0 = time.time()
    full = Verifier(llm, base).verify(records)
    secs16 = time.time() - t0
    assert all(r.error is None for r in full), [r.error for r in full if r.error]
    th, method = base.threshold, base.method
    out: dict = {"records": len(records), "labels_error": sum(r["label"] != -1 for r in records),
                 "k16_seconds": round(secs16, 1), "fixed": [], "adaptive": [], "simulated": []}
    for k in FIXED:
        preds, toks = zip(*(first_k(r, k, th, method) for r in full))
        out["fixed"].append({"k": k, "f1": f1_of(records, list(preds)), "generated_tokens": sum(toks),
                             "tokens_by_subset": by_subset(records, toks),
                             "derived_from_k16": k != KMAX})
    # check: separate K=4 and K=8 runs equal the first chains of the K=16 run
    sub = records[:check]
    checks = []
    for k in (4, 8):
        sep = Verifier(llm, VerifyConfig(format="prmkern", num_chains=k, seed=0)).verify(sub)
        same_tokens = all(a.turns[0].token_ids == b.turns[0].token_ids
                          for s, f in zip(sep, full) for a, b in zip(s.chains, f.chains[:k]))
        same_pred = all(s.prediction == first_k(f, k, th, method)[0] for s, f in zip(sep, full))
        checks.append({"k": k, "records": len(sub), "tokens_equal": same_tokens, "predictions_equal": same_pred})
    out["prefix_check"] = checks
    for m, kmax, d in GRID:
        rows = [replay(r, m, kmax, d, th, method) for r in full]
        out["simulated"].append({"chains_min": m, "chains_max": kmax, "chains_risk": d, "f1": f1_of(records, [p for _, p, _ in rows]),
                                 "generated_tokens": sum(t for _, _, t in rows),
                                 "tokens_by_subset": by_subset(records, [t for _, _, t in rows]),
                                 "mean_chains": sum(n for n, _, _ in rows) / len(rows)})
    for m, kmax, d in real:
        t0 = time.time()
        ad = Verifier(llm, VerifyConfig(format="prmkern", chains_min=m, chains_max=kmax, chains_risk=d,
                                        seed=0)).verify(records)
        secs = time.time() - t0
        sim = [replay(r, m, kmax, d, th, method) for r in full]
        hist: dict[int, int] = {}
        for r in ad:
            hist[r.chains_run] = hist.get(r.chains_run, 0) + 1
        out["adaptive"].append({
            "chains_min": m, "chains_max": kmax, "chains_risk": d,
            "f1": f1_of(records, [r.prediction for r in ad]), "generated_tokens": sum(tokens_of(r.chains) for r in ad),
            "tokens_by_subset": by_subset(records, [tokens_of(r.chains) for r in ad]),
            "mean_chains": sum(r.chains_run for r in ad) / len(ad), "chains_run": dict(sorted(hist.items())),
            "seconds": round(secs, 1),
            "equals_replay": all(r.chains_run == n and r.prediction == p and tokens_of(r.chains) == t
                                 for r, (n, p, t) in zip(ad, sim))})
    print(f"{name}: {json.dumps(out)}", file=sys.stderr)
    return out


def plot(results: dict, path: str) -> None:
    """One panel per subset (held-out: all; ProcessBench: gsm8k, math): F1 against that subset's generated tokens;
    on a panel where F1 is 0 at every K (accuracy on error-free solutions 0), the accuracy on erroneous ones too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    panels = [(name, sub) for name, r in results.items() for sub in r["fixed"][0]["tokens_by_subset"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)

    def y(row: dict, key: str) -> float:
        v = row["f1"][key]
        return float("nan") if v is None else v
    for ax, (name, sub) in zip(axes[0], panels):
        r = results[name]
        flat = all(y(f, sub) == 0 for f in r["fixed"])
        keys = [(sub, "o-", "F1")] + ([(f"{sub}_acc_err", "s--", "accuracy on erroneous")] if flat else [])
        for key, style, what in keys:
            xs = [f["tokens_by_subset"][sub] for f in r["fixed"]]
            ys = [y(f, key) for f in r["fixed"]]
            ax.plot(xs, ys, style, color="tab:blue", label=f"fixed K: {what}")
            for f, x, yy in zip(r["fixed"], xs, ys):
                ax.annotate(f"K={f['k']}", (x, yy), textcoords="offset points", xytext=(3, -11), fontsize=7)
            for s in r["simulated"]:
                ax.plot(s["tokens_by_subset"][sub], y(s, key), ".", color="tab:gray", alpha=0.5)
            for a in r["adaptive"]:
                ax.plot(a["tokens_by_subset"][sub], y(a, key), "*", markersize=12, color="tab:red")
                ax.annotate(f"{a['chains_min']}..{a['chains_max']}", (a["tokens_by_subset"][sub], y(a, key)),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:red")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("generated tokens (log)")
        ax.set_ylabel("F1" + (" / accuracy on erroneous (dashed)" if flat else ""))
        ax.set_title(f"ProcessBench {sub}" if sub != "all" else name, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", color="tab:blue", label="fixed K (first K of the K=16 chains)"),
               plt.Line2D([], [], marker=".", ls="", color="tab:gray",
                          label="adaptive, replayed (min 1/2/4, max 8/16, risk 0.01-0.2)"),
               plt.Line2D([], [], marker="*", ls="", markersize=10, color="tab:red", label="adaptive, run (min..max)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("shipped verifier (prmkern format, fp32, CPU): F1 against generated tokens", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processbench-dir", default="/work/shared/data/processbench")
    ap.add_argument("--processbench-limit", type=int, default=100, help="records per subset, label-balanced")
    ap.add_argument("--min-room", type=int, default=256,
                    help="ProcessBench: keep records whose prompt leaves a chain this many tokens of the context")
    ap.add_argument("--check-records", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real", default="2,16,0.05;2,8,0.05",
                    help="adaptive settings run for real, 'MIN,MAX,RISK;...' (the others are replayed)")
    ap.add_argument("--sets", default="heldout,processbench")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "adaptive_chains.json"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "img", "adaptive_chains.png"))
    ap.add_argument("--plot-only", action="store_true", help="redraw --png from the --out JSON, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.out) as f:
            plot(json.load(f)["sets"], args.png)
        return
    torch.set_num_threads(args.threads)
    llm = LLM(os.path.join(ROOT, "prmkern", "data", "verifier"), dtype="float32", device="cpu")
    results = {}
    real = [(int(m), int(k), float(d)) for m, k, d in (x.split(",") for x in args.real.split(";"))]
    wanted = args.sets.split(",")
    if "heldout" in wanted:
        with open(os.path.join(ROOT, "prmkern", "data", "verifier", "examples.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        results["held-out examples"] = run_set(llm, "heldout", recs, args.check_records, real)
    if "processbench" in wanted:
        recs = []
        probe = Verifier(llm, VerifyConfig(format="prmkern"))
        room = llm.engine.max_model_len - args.min_room

        def fits(r: dict) -> bool:  # the prompt leaves a chain at least --min-room tokens of the context
            problem, steps = probe.prepare(r)
            return len(probe.encode(probe.fmt.render(problem, steps, probe.tok))) <= room
        skipped = {}
        for sub in ("gsm8k", "math"):
            every = load_processbench(os.path.join(args.processbench_dir, f"{sub}.json"))
            short = [r for r in every if fits(r)]
            skipped[sub] = {"records": len(every), "fit": len(short)}
            part = balanced_limit(short, args.processbench_limit)
            recs += [{**r, "subset": sub} for r in part]
        results["ProcessBench gsm8k + math"] = run_set(llm, "processbench", recs, args.check_records, real)
        results["ProcessBench gsm8k + math"]["context_filter"] = {
            "max_model_len": llm.engine.max_model_len, "max_prompt_tokens": room, "per_subset": skipped}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    doc = {"cpu": cpu_model(), "commit": commit, "date": datetime.date.today().isoformat(),
           "load_after": os.getloadavg(), "threads": args.threads, "model": "prmkern/data/verifier (fp32)",
           "format": "prmkern", "temperature": 0.6, "max_tokens": 1024, "seed": 0, "k_max": KMAX,
           "processbench_limit_per_subset": args.processbench_limit, "sets": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    plot(results, args.png)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
