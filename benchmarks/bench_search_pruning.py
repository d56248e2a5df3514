"""Search pruning on streamed verdicts: best-of-N and beam search with and without `prune`, side by side.

For each set (MATH-500 problems, default ../shared/data/math500/test.jsonl, the first --problems whose problem and
reference fit --max-chars; and the shipped verifier's held-out examples whose steps are all correct) the search runs
with the shipped verifier (prmkern/data/verifier, `prmkern` format, K=--chains sampled chains, seeded) as:

* bon/full: best_of_n, the candidates verified by Verifier.verify (one generate call, nothing dropped);
* bon/stream: the same candidates on streamed verdicts in one continuous batch, nothing dropped (what pruning runs
  on, so bon/full vs bon/stream isolates the batching and bon/stream vs bon/exact, bon/error the pruning);
* bon/exact, bon/error: best_of_n(prune='exact' | 'error') (pruning.py);
* beam/full, beam/exact: beam_search without and with prune=True.

The shipped checkpoint cannot write MATH solutions, so the candidates come from bench_search_sessions.ReplayGenerator
(the reference solution's paragraphs; sample j > 0 changes one digit), which gives the verifier real multi-step
text: the generator's tokens are the replayed candidates' tokens (counted, not sampled; equal in every mode). Per run
the JSON has the wall seconds, the verifier's generated, prompt and prefilled tokens (engine counters), aborted
requests, candidates pruned, accuracy against the reference answer, and how many problems chose the same candidate
as the unpruned run (beam: the same candidates, texts and scores to 1e-4).

    python benchmarks/bench_search_pruning.py --problems 3 --beam-problems 2 --max-steps 3 --threads 2 \
        --out benchmarks/results/search_pruning_cpu.json

The last stdout line is one JSON document.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_search_sessions import MATH500, VERIFIER, ReplayGenerator, cpu_model  # noqa: E402
from prmkern import LLM  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402
from prmkern.verify.pruning import verify_pruned  # noqa: E402
from prmkern.verify.search import beam_search, best_of_n  # noqa: E402


class CountingReplay(ReplayGenerator):
    """The replay generator, counting the tokens of the candidates it hands out (the generator's output)."""

    tokens = 0

    def generate(self, prompts, params, use_tqdm=False):
        outs = super().generate(prompts, params, use_tqdm)
        self.tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        return outs


def load_sets(args) -> dict[str, list[dict]]:
    with open(args.data) as f:
        math = [p for p in map(json.loads, f) if len(p["solution"]) + len(p["problem"]) <= args.max_chars]
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        held = [{"problem": e["problem"], "solution": "\n\n".join(e["steps"]), "answer": e["answer"]}
                for e in map(json.loads, f) if e["label"] == -1]
    sets = {"math500": math[:args.problems], "heldout": held[:args.problems]}
    return {k: sets[k] for k in args.sets.split(",")}


def measure(llm, gen, fn):
    """Runs fn(); the engine's counters and the generator's tokens over it."""
    s0, g0 = dict(vars(llm.stats)), gen.tokens
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    s1 = vars(llm.stats)
    return out, {"seconds": round(seconds, 3), "generator_tokens": gen.tokens - g0,
                 **{f"verifier_{k}": s1[k] - s0[k] for k in ("generated_tokens", "prompt_tokens", "prefill_tokens",
                                                             "aborted_requests")}}


def streamed_unpruned(gen, verifier, problems, n):
    """best_of_n's candidates on streamed verdicts with nothing dropped (the batching pruning runs on)."""
    def verify_streamed(records, progress=None):
        groups = [r["id"].split(":")[0] for r in records]
        return verify_pruned(verifier, records, groups, None).results
    verifier.verify = verify_streamed  # what best_of_n calls when it does not prune (this instance only)
    return best_of_n(gen, verifier, problems, n=n)


def bon_row(results, stats, reference=None) -> dict:
    row = {**stats, "pruned": sum(r.pruned for r in results),
           "accuracy": sum(bool(r.correct) for r in results) / len(results),
           "chosen": [r.candidates.index(r.chosen) if r.chosen in r.candidates else None for r in results]}
    if reference is not None:
        row["same_choice"] = sum(a == b for a, b in zip(row["chosen"], reference["chosen"]))
    return row


def run_set(name, problems, args) -> dict:
    llm = LLM(VERIFIER, device="cpu", dtype="float32", seed=0, num_kvcache_blocks=args.kv_blocks)
    gen = CountingReplay(llm.tokenizer, problems, args.max_steps)

    def verifier():
        return Verifier(llm, VerifyConfig(format="prmkern", num_chains=args.chains, seed=args.verify_seed,
                                          max_tokens=args.verify_max_tokens, method="min"))
    best_of_n(gen, verifier(), problems[:1], n=2)  # warm-up: first-call costs outside the timings
    reps = [one_rep(llm, gen, verifier, problems, args) for _ in range(args.reps)]
    return {"problems": len(problems), "beam_problems": min(args.beam_problems, len(problems)),
            "runs": {mode: [r[mode] for r in reps] for mode in reps[0]}}


def one_rep(llm, gen, verifier, problems, args) -> dict:
    """Every mode once, in a fixed order (the machine's load moves between them: compare within a rep)."""
    runs: dict[str, dict] = {}
    res, st = measure(llm, gen, lambda: best_of_n(gen, verifier(), problems, n=args.n))
    runs["bon/full"] = bon_row(res, st)
    res, st = measure(llm, gen, lambda: streamed_unpruned(gen, verifier(), problems, args.n))
    runs["bon/stream"] = bon_row(res, st, runs["bon/full"])
    for rule in ("exact", "error"):
        res, st = measure(llm, gen, lambda: best_of_n(gen, verifier(), problems, n=args.n, prune=rule))
        runs[f"bon/{rule}"] = bon_row(res, st, runs["bon/full"])
    beams = {}
    for prune in (False, True):
        out, st = measure(llm, gen, lambda: [beam_search(gen, verifier(), p["problem"], beam_width=args.beam_width,
                                                         expand=args.expand, max_steps=args.max_steps,
                                                         prune=prune) for p in problems[:args.beam_problems]])
        beams[prune] = out
        runs["beam/exact" if prune else "beam/full"] = {**st, "pruned": sum(r.pruned for r in out),
                                                        "candidates": sum(len(r.candidates) for r in out)}

    def same(a, b) -> bool:
        return a.chosen.text == b.chosen.text and [c.text for c in a.candidates] == [c.text for c in b.candidates] \
            and all(abs((x.score or 0) - (y.score or 0)) <= 1e-4 * max(abs(x.score or 0), 1e-3)
                    for x, y in zip(a.candidates, b.candidates))
    runs["beam/exact"]["same_search"] = sum(same(a, b) for a, b in zip(beams[False], beams[True]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=MATH500)
    ap.add_argument("--sets", default="math500,heldout")
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--max-chars", type=int, default=400, help="MATH-500: problem + reference solution, at most")
    ap.add_argument("--n", type=int, default=4, help="best-of-N candidates per problem")
    ap.add_argument("--chains", type=int, default=4, help="K: verifier chains per candidate")
    ap.add_argument("--verify-seed", type=int, default=3)
    ap.add_argument("--verify-max-tokens", type=int, default=256)
    ap.add_argument("--beam-problems", type=int, default=2)
    ap.add_argument("--beam-width", type=int, default=1)
    ap.add_argument("--expand", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=3, help="reference paragraphs used per problem")
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2, help="times every mode runs (reported one by one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    sets = {name: run_set(name, probs, args) for name, probs in load_sets(args).items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    doc = {"benchmark": "search_pruning", "device": "cpu", "cpu": cpu_model(), "threads": args.threads,
           "commit": commit, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
           "args": vars(args), "sets": sets}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
