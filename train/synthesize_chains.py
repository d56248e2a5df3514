"""Verification chains for SFT, ThinkPRM's recipe: sample K chains per (problem, solution) from a teacher, keep the
ones that agree with the gold labels.

    python train/synthesize_chains.py --teacher some-checkpoint/ --data labelled.jsonl --k 4 --out chains.jsonl

Input records carry `problem`, `steps` and ProcessBench's `label` (first wrong step, -1 if none). The teacher runs
through prmkern's LLM with SamplingParams(n=K): the prompt (PRMKERN format) is prefilled once and shared by the K
chains. As ThinkPRM filters its synthetic chains: each chain is first normalised (`\\boxed{\\text{correct}}` ->
`\\boxed{correct}`, likewise incorrect); it is kept when (`keep_chain`) it finished on its own (not cut by
--max-tokens) within --max-chain-tokens tokens and every step up to the first wrong one has a parsable verdict equal
to the gold one (correct before it, incorrect at it; later steps are free); the kept chain is cut right after its last
step verdict and the gold final question is appended ("\nIs the solution correct? Yes" or "No", from the label), so
whatever the teacher wrote after its last verdict never becomes training text (`finalize_chain`). At most
--per-solution distinct chains are kept per solution; then the kept set is balanced by final correctness (as many
correct-solution chains as wrong-solution ones, the larger side subsampled with --seed). Output records are the
input records plus `chain` (the text after PRMKERN's prefix), ready for train/sft.py.

It does not: write gold chains (train/synthetic.py does, for the synthetic task) or judge chain quality beyond
agreement with the labels.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import read_records, render_prompt  # noqa: E402


FINAL_QUESTION = "\nIs the solution correct? {answer}"
_TEXT_VERDICT = re.compile(r"\\boxed\{\\text\{\s*(correct|incorrect)\s*\}\}")
_VERDICT = re.compile(r"\\boxed\{\s*(?:correct|incorrect)\s*\}", re.IGNORECASE)


def normalise_chain(text: str) -> str:
    """\\boxed{\\text{correct}} -> \\boxed{correct} (and incorrect), as ThinkPRM normalises teacher chains."""
    return _TEXT_VERDICT.sub(lambda m: "\\boxed{" + m.group(1) + "}", text)


def keep_chain(parsed, label: int, num_steps: int, require_final: bool = False) -> bool:
    """True when the parsed chain's verdicts match the gold `label` up to the first error (a ParsedOutput from
    prmkern.verify.parse_output). require_final: its own closing answer must match too (the gold one is appended
    by finalize_chain either way)."""
    if not -1 <= label < num_steps:
        raise ValueError(f"label={label}; accepted: -1 or a step index in [0, {num_steps})")
    last = label if label != -1 else num_steps - 1
    for i in range(last + 1):
        gold = "incorrect" if i == label else "correct"
        if parsed.steps[i].status != gold:
            return False
    return not require_final or parsed.final == ("correct" if label == -1 else "incorrect")


def finalize_chain(text: str, label: int) -> str:
    """Cut after the last step verdict, then append the gold final question and answer."""
    verdicts = list(_VERDICT.finditer(text))
    if not verdicts:
        raise ValueError("a chain without any step verdict cannot be finalized")
    return text[:verdicts[-1].end()] + FINAL_QUESTION.format(answer="Yes" if label == -1 else "No")


def balance(records: list[dict], seed: int) -> list[dict]:
    """As many records with label -1 as with an error: the larger side is subsampled (deterministic in seed)."""
    ok = [r for r in records if r["label"] == -1]
    err = [r for r in records if r["label"] != -1]
    n = min(len(ok), len(err))
    rng = random.Random(seed)
    keep = rng.sample(ok, n) + rng.sample(err, n)
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(keep, key=lambda r: order[id(r)])


def synthesize(llm, records: list[dict], *, k: int, temperature: float, max_tokens: int, max_chain_tokens: int,
               per_solution: int, seed: int) -> tuple[list[dict], dict]:
    """Kept (unbalanced) chain records and counts of why chains were dropped."""
    from prmkern.sampling_params import SamplingParams
    from prmkern.verify import PRMKERN, parse_output

    prompts = [render_prompt(llm.tokenizer, r["problem"], r["steps"]) for r in records]
    outs = llm.generate(prompts, SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed))
    kept, stats = [], {"chains": 0, "kept": 0, "unfinished": 0, "too_long": 0, "disagree": 0, "duplicate": 0,
                       "over_per_solution": 0, "failed_requests": 0}
    for r, out in zip(records, outs):
        if out.error:
            stats["failed_requests"] += 1
            continue
        texts: set[str] = set()
        for c in out.outputs:
            stats["chains"] += 1
            if c.finish_reason == "length":
                stats["unfinished"] += 1
                continue
            if len(c.token_ids) > max_chain_tokens:
                stats["too_long"] += 1
                continue
            text = normalise_chain(c.text)
            if not keep_chain(parse_output(PRMKERN, text, len(r["steps"])), r["label"], len(r["steps"])):
                stats["disagree"] += 1
                continue
            text = finalize_chain(text, r["label"])
            if text in texts:
                stats["duplicate"] += 1
            elif len(texts) >= per_solution:
                stats["over_per_solution"] += 1
            else:
                texts.add(text)
                kept.append({**r, "chain": text})
                stats["kept"] += 1
    return kept, stats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="Hugging Face checkpoint of the teacher verifier")
    ap.add_argument("--data", required=True, help="JSONL with problem, steps, label")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=512, help="generation limit per chain")
    ap.add_argument("--max-chain-tokens", type=int, default=384, help="length cap on kept chains")
    ap.add_argument("--per-solution", type=int, default=1)
    ap.add_argument("--no-balance", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from prmkern.llm import LLM

    records = read_records(args.data)
    llm = LLM(args.teacher, dtype=args.dtype, device=args.device, seed=args.seed)
    kept, stats = synthesize(llm, records, k=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                             max_chain_tokens=args.max_chain_tokens, per_solution=args.per_solution, seed=args.seed)
    out = kept if args.no_balance else balance(kept, args.seed)
    with open(args.out, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    stats["written"] = len(out)
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
