"""ProcessBench-style F1 on a held-out synthetic set: the generative verifier (K=1 and K=K chains) and the
discriminative baseline, side by side.

    python train/evaluate.py --model prmkern/data/verifier --disc /tmp/disc --n 200 --seed 12345 \
        --exclude /tmp/verifier/train.jsonl

Generative: K chains per solution through prmkern's LLM (the prompt's KV shared by the chains), each parsed with
prmkern.verify (PRMKERN format); a verdict's P(correct) is read from the engine's log-probabilities of the two
verdict tokens at the verdict position; step scores are the mean over chains; the predicted earliest error is the
first step under 0.5, and null (counted wrong) when a step before any such error got no score from any chain
(the rule of `prmkern verify`: a solution whose steps were not all judged is not "no error"). K=1 is the mean of
the F1 of each chain alone (the K chains are K independent single-chain runs), which has less variance than one
draw; a greedy single chain is a third row. Discriminative: P(correct) at each step separator, same threshold.
Also printed: the share of the generative verifier's step verdicts that agree with the gold labels (every step up
to and including the first wrong one, every chain; an unparsed verdict counts as wrong) and of its final Yes/No.
Rows marked "@best-t" use the threshold (0.05..0.95) that is best on the held-out set itself: an optimistic bound
that shows how much a miscalibrated score loses at 0.5, not a fair number. The held-out set comes from a seed
never used for training; --exclude drops any record whose problem and steps appear in a training file. The last
stdout line is one JSON document.

It does not: train anything, or read real ProcessBench data (point prmkern's own eval at that).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import read_records, render_prompt  # noqa: E402
from synthetic import make_dataset  # noqa: E402


def heldout(n: int, seed: int, exclude: list[str]) -> list[dict]:
    seen = set()
    for path in exclude:
        seen |= {(r["problem"], tuple(r["steps"])) for r in read_records(path)}
    recs = [e.record() for e in make_dataset(n + len(seen) // 50 + 20, seed, prefix=f"heldout{seed}")]
    return [r for r in recs if (r["problem"], tuple(r["steps"])) not in seen][:n]


def generative_chains(model_dir: str, records: list[dict], k: int, temperature: float, max_tokens: int,
                      seed: int, threads: int, device: str | None = None) -> tuple[list[list], dict]:
    """Per record, K ChainScores; plus the engine's counters (prompt tokens, prefix-cache hits, generated)."""
    from prmkern.llm import LLM
    from prmkern.sampling_params import SamplingParams
    from prmkern.verify import PRMKERN, Generated, parse_output, score_chain

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model_dir, dtype="float32", device=device, seed=seed)
    tok = llm.tokenizer
    ids = PRMKERN.verdict_token_ids(tok)
    prompts = [render_prompt(tok, r["problem"], r["steps"]) for r in records]
    params = SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed,
                            logprob_token_ids=list(ids))
    outs = llm.generate(prompts, params)
    chains = []
    for r, out in zip(records, outs):
        if out.error:
            raise RuntimeError(f"record {r['id']}: {out.error}")
        per = []
        for c in out.outputs:
            parsed = parse_output(PRMKERN, c.text, len(r["steps"]), finished=c.finish_reason != "length")
            per.append(score_chain(PRMKERN, parsed, Generated(c.token_ids, c.token_logprobs), verdict_ids=ids,
                                   tokenizer=tok))
        chains.append(per)
    return chains, {k: v for k, v in vars(llm.stats).items() if isinstance(v, (int, float))}


def f1_of(records: list[dict], predictions: list[int]) -> dict:
    from prmkern.verify.processbench import processbench_f1
    res = processbench_f1([r["label"] for r in records], predictions)
    return {"f1": round(res.f1, 4), "acc_err": round(res.acc_err, 4), "acc_ok": round(res.acc_ok, 4)}


def verdict_agreement(records: list[dict], chains: list[list]) -> dict:
    """Share of step verdicts (gold-labelled steps, all chains) and final Yes/No that match the gold labels."""
    right = total = final_right = final_total = 0
    for r, per in zip(records, chains):
        last = r["label"] if r["label"] != -1 else len(r["steps"]) - 1
        for ch in per:
            for i in range(last + 1):
                gold = "incorrect" if i == r["label"] else "correct"
                right += ch.steps[i].status == gold
                total += 1
            final_total += 1
            final_right += ch.parsed.final == ("correct" if r["label"] == -1 else "incorrect")
    # what a verifier that always answers "correct" / "Yes" gets on the same gold verdicts, for comparison
    gold_steps = sum((r["label"] if r["label"] != -1 else len(r["steps"]) - 1) + 1 for r in records)
    errors = sum(r["label"] != -1 for r in records)
    return {"step_verdicts_right": round(right / max(1, total), 4), "step_verdicts": total,
            "final_verdicts_right": round(final_right / max(1, final_total), 4),
            "always_correct_step_share": round(1 - errors / max(1, gold_steps), 4),
            "always_yes_final_share": round(1 - errors / max(1, len(records)), 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="generative verifier (HF checkpoint directory)")
    ap.add_argument("--disc", default=None, help="discriminative baseline (train/discriminative.py output)")
    ap.add_argument("--data", default=None, help="held-out JSONL (default: generate --n records from --seed)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--exclude", nargs="*", default=[], help="training JSONL files whose records are dropped")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy single-chain row")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k {args.k}; accepted: an int >= 1")

    from prmkern.verify.scoring import aggregate, earliest_error  # the CLI's rule for unscored steps

    def predict(chains_of_one: list, n_steps: int) -> int | None:
        return earliest_error([s.score for s in aggregate(chains_of_one, n_steps).steps], 0.5)
    records = read_records(args.data) if args.data else heldout(args.n, args.seed, args.exclude)
    n_err = sum(r["label"] != -1 for r in records)
    print(f"held-out: {len(records)} solutions ({n_err} with an error, {len(records) - n_err} correct)", flush=True)

    t0 = time.time()
    chains, engine = generative_chains(args.model, records, args.k, args.temperature, args.max_tokens, args.seed,
                                       args.threads, args.device)
    gen_s = time.time() - t0
    rows: dict[str, dict] = {}
    singles = []
    for j in range(args.k):
        preds = [predict([per[j]], len(r["steps"])) for r, per in zip(records, chains)]
        singles.append(f1_of(records, preds))
    rows["generative K=1"] = {key: round(sum(s[key] for s in singles) / args.k, 4) for key in singles[0]}
    preds = [predict(per, len(r["steps"])) for r, per in zip(records, chains)]
    rows[f"generative K={args.k}"] = f1_of(records, preds)
    step_means = [[s.score for s in aggregate(per, len(r["steps"])).steps] for r, per in zip(records, chains)]
    agreement = verdict_agreement(records, chains)
    if not args.no_greedy:  # one greedy chain: what a deterministic run of the verifier says
        greedy, _ = generative_chains(args.model, records, 1, 0.0, args.max_tokens, args.seed, args.threads,
                                      args.device)
        rows["generative greedy"] = f1_of(records, [predict(per, len(r["steps"])) for r, per in zip(records, greedy)])
        agreement.update({f"greedy_{k}": v for k, v in verdict_agreement(records, greedy).items()})

    # the earlier rule (an unscored step counts as "no error"), on the same chains: what the rule change moved
    def predict_old(chains_of_one: list, n_steps: int) -> int:
        scores = [s.score for s in aggregate(chains_of_one, n_steps).steps]
        return next((i for i, x in enumerate(scores) if x is not None and x < 0.5), -1)
    old_singles = [f1_of(records, [predict_old([per[j]], len(r["steps"])) for r, per in zip(records, chains)])
                   for j in range(args.k)]
    old_rule = {"generative K=1": {key: round(sum(x[key] for x in old_singles) / args.k, 4) for key in singles[0]},
                f"generative K={args.k}": f1_of(records, [predict_old(per, len(r["steps"]))
                                                          for r, per in zip(records, chains)])}
    if not args.no_greedy:
        old_rule["generative greedy"] = f1_of(records, [predict_old(per, len(r["steps"]))
                                                        for r, per in zip(records, greedy)])

    if args.disc:
        from transformers import AutoTokenizer, Qwen2ForTokenClassification
        from discriminative import step_probabilities
        model = Qwen2ForTokenClassification.from_pretrained(args.disc, dtype=torch.float32)
        probs = step_probabilities(model, AutoTokenizer.from_pretrained(args.disc), records)
        rows["discriminative"] = f1_of(records, [earliest_error(p, 0.5) for p in probs])
    # the same scores at the threshold that is best on this very set: an optimistic bound, printed apart
    oracle = {f"generative K={args.k}": step_means}
    if args.disc:
        oracle["discriminative"] = probs
    for name, scores in oracle.items():
        best = max((f1_of(records, [earliest_error(p, t) for p in scores]) | {"threshold": t}
                    for t in [i / 20 for i in range(1, 20)]), key=lambda r: r["f1"])
        rows[f"{name} @best-t"] = best

    print(f"\n{'verifier':<26} {'F1':>7} {'acc_err':>8} {'acc_ok':>7}")
    for name, r in rows.items():
        extra = f"  (threshold {r['threshold']})" if "threshold" in r else ""
        print(f"{name:<26} {r['f1']:>7.4f} {r['acc_err']:>8.4f} {r['acc_ok']:>7.4f}{extra}")
    print(f"\ngenerative step verdicts right: {agreement['step_verdicts_right']:.1%} of {agreement['step_verdicts']}"
          f"; final Yes/No right: {agreement['final_verdicts_right']:.1%}; generation {gen_s:.0f} s "
          f"(always 'correct': {agreement['always_correct_step_share']:.1%} of step verdicts, "
          f"{agreement['always_yes_final_share']:.1%} of final ones)")
    if "greedy_step_verdicts_right" in agreement:
        print(f"greedy step verdicts right: {agreement['greedy_step_verdicts_right']:.1%}; final Yes/No right: "
              f"{agreement['greedy_final_verdicts_right']:.1%}")
    print(f"engine: {engine}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "model": args.model, "disc": args.disc,
              "n": len(records), "k": args.k, "temperature": args.temperature, "seed": args.seed,
              "rows": rows, "old_rule_rows": old_rule, **agreement, "generation_s": round(gen_s, 1), "engine": engine}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
