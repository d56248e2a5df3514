"""Step labels by Relative Progress Estimation (GenPRM's recipe), with Monte-Carlo rollouts through the engine.

    python train/rpe_labels.py --policy some-checkpoint/ --data solutions.jsonl --out labelled.jsonl

For a solution with steps a_0..a_{n-1}, state s_t is the problem plus the first t steps. MC(s_t) is the share of
rollouts from s_t (the policy continues the solution to a final answer) whose answer prmkern.verify.grading judges equal
to the record's `answer`; MC(s_t, a_t) = MC(s_{t+1}), and MC(s_n) is whether the solution's own final answer is right
(no rollout needed). As GenPRM defines it:
* MC of the first state (the problem alone: the policy's Pass@1) comes from a large sample (`--n-pass`, 256);
* problems whose sample is all correct or all wrong are dropped (no signal: every step would get the same label);
* the rollouts per later state, K, follow the problem's Pass@1 band (`--k-bands`, default "0.1:128,0.5:64,1:32":
  K=128 below 0.1, 64 below 0.5, 32 otherwise; the band edges are configurable);
* rollouts sample at T=0.7 to the full length (`--max-tokens`, 4096), as GenPRM's policy sampling did.
The relative progress of step t is P_t = MC(s_t, a_t) / MC(s_t); step t is labelled correct iff P_t >= 0.8, and
every step from the first state with MC = 0 on is labelled wrong (`rpe_step_labels`). The rollouts of one state are
one request with SamplingParams(n=K), so they share the state's KV, and successive states of one solution share the
problem and earlier steps through the prefix cache.

Output: the kept records plus `rpe` = {mc: [MC(s_0)..MC(s_n)], progress: [P_t or null], step_labels: [1/0 per
step], k: K, pass_at_1} and `label` set to the first step labelled wrong (-1 if none), so the file is
ProcessBench-shaped for SFT data, the discriminative baseline or train/synthesize_chains.py.

It does not: estimate anything with a value model (pure Monte-Carlo), or check the policy's rollouts beyond their
final answer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import read_records  # noqa: E402

SOLVER_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


def rpe_step_labels(mc: list[float], threshold: float = 0.8) -> tuple[list[float | None], list[int]]:
    """mc: [MC(s_0), ..., MC(s_n)] for a solution of n steps -> (P_t per step, None where MC(s_t) = 0; labels 1/0).

    Step t is correct iff MC(s_t) > 0, no earlier state had MC = 0, and MC(s_{t+1}) / MC(s_t) >= threshold."""
    if len(mc) < 2:
        raise ValueError(f"mc needs MC(s_0)..MC(s_n) for n >= 1 steps, got {len(mc)} values")
    if any(not 0.0 <= m <= 1.0 for m in mc):
        raise ValueError(f"MC estimates must lie in [0, 1], got {mc}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}; accepted: a float in (0, 1]")
    progress: list[float | None] = []
    labels: list[int] = []
    dead = False  # a state with MC = 0 was reached: everything from there on is wrong
    for t in range(len(mc) - 1):
        dead = dead or mc[t] == 0
        if dead:
            progress.append(None)
            labels.append(0)
            continue
        p = mc[t + 1] / mc[t]
        progress.append(p)
        labels.append(int(p >= threshold))
    return progress, labels


def first_wrong(labels: list[int]) -> int:
    return next((i for i, y in enumerate(labels) if y == 0), -1)


def rollout_prompt(tokenizer, problem: str, steps: list[str]) -> str:
    """The policy's prompt for state s_t: a solver request, and the first t steps already written."""
    from prmkern.verify.formats import render_messages
    head = render_messages([{"role": "user", "content": f"{problem.strip()}\n{SOLVER_INSTRUCTION}"}], tokenizer)
    return head + "".join(s.strip() + "\n" for s in steps)


DEFAULT_BANDS = ((0.1, 128), (0.5, 64), (1.0, 32))


def parse_bands(text: str) -> tuple[tuple[float, int], ...]:
    """"0.1:128,0.5:64,1:32" -> ((0.1, 128), (0.5, 64), (1.0, 32)): K for Pass@1 below each edge (the last: up to 1)."""
    try:
        bands = tuple((float(e), int(k)) for e, k in (part.split(":") for part in text.split(",")))
    except ValueError as e:
        raise ValueError(f"--k-bands {text!r}: expected EDGE:K pairs like '0.1:128,0.5:64,1:32'") from e
    edges = [e for e, _ in bands]
    if not bands or edges != sorted(edges) or edges[-1] < 1.0 or any(k < 1 for _, k in bands):
        raise ValueError(f"--k-bands {text!r}: edges must increase up to 1 and every K be >= 1")
    return bands


def rollouts_for(pass_at_1: float, bands: tuple[tuple[float, int], ...] = DEFAULT_BANDS) -> int:
    """K for a problem whose Pass@1 (MC of the first state) is pass_at_1: the first band whose edge exceeds it."""
    for edge, k in bands:
        if pass_at_1 < edge:
            return k
    return bands[-1][1]


def label_records(llm, records: list[dict], *, n_pass: int = 256, bands=DEFAULT_BANDS, temperature: float = 0.7,
                  max_tokens: int = 4096, seed: int = 0, threshold: float = 0.8) -> tuple[list[dict], list[dict]]:
    """RPE labels for every record (needs `problem`, `steps`, `answer`) -> (kept records, dropped records).

    Dropped: the problem's n_pass rollouts were all correct or all wrong (each dropped record gets `rpe_dropped`)."""
    from prmkern.verify.grading import grade
    from prmkern.sampling_params import SamplingParams

    if n_pass < 2:
        raise ValueError(f"n_pass={n_pass}: Pass@1 needs a sample of at least 2 rollouts")
    for ri, r in enumerate(records):
        for key in ("problem", "steps", "answer"):
            if key not in r:
                raise ValueError(f"record {r.get('id', ri)} lacks {key!r}; RPE needs problem, steps and answer")

    def params(n: int, *key) -> SamplingParams:
        return SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens,
                              seed=hash((seed, *key)) & ((1 << 62) - 1))

    def mc_of(out, ri: int, t: int) -> float:
        if out.error:
            raise RuntimeError(f"rollouts for record {ri} state {t} failed: {out.error}")
        prefix = "\n".join(s.strip() for s in records[ri]["steps"][:t])
        wins = sum(grade((prefix + "\n" if prefix else "") + c.text, records[ri]["answer"]) for c in out.outputs)
        return wins / len(out.outputs)

    # 1. Pass@1 of each distinct (problem, answer) from the first state, with a large sample.
    problems = list(dict.fromkeys((r["problem"], str(r["answer"])) for r in records))
    first = {pa: ri for ri, r in reversed(list(enumerate(records))) for pa in [(r["problem"], str(r["answer"]))]}
    outs = llm.generate([rollout_prompt(llm.tokenizer, p, []) for p, _ in problems],
                        [params(n_pass, "pass", i) for i in range(len(problems))])
    pass_at_1 = {pa: mc_of(out, first[pa], 0) for pa, out in zip(problems, outs)}
    # 2. Drop problems without signal; 3. K by band; rollouts from the later states.
    kept, dropped, prompts, plist, where = [], [], [], [], []
    for ri, r in enumerate(records):
        p1 = pass_at_1[(r["problem"], str(r["answer"]))]
        if p1 in (0.0, 1.0):
            dropped.append({**r, "rpe_dropped": f"Pass@1 = {p1} over {n_pass} rollouts"})
            continue
        k = rollouts_for(p1, bands)
        kept.append((ri, k, p1))
        for t in range(1, len(r["steps"])):  # s_1 .. s_{n-1}; s_0 is the Pass@1 state, s_n is graded directly
            prompts.append(rollout_prompt(llm.tokenizer, r["problem"], r["steps"][:t]))
            plist.append(params(k, ri, t))
            where.append((ri, t))
    mc = {ri: [p1] + [0.0] * len(records[ri]["steps"]) for ri, _, p1 in kept}
    for (ri, t), out in zip(where, llm.generate(prompts, plist) if prompts else []):
        mc[ri][t] = mc_of(out, ri, t)
    result = []
    for ri, k, p1 in kept:
        r, m = records[ri], mc[ri]
        m[-1] = float(grade("\n".join(r["steps"]), r["answer"]))
        progress, labels = rpe_step_labels(m, threshold)
        result.append({**r, "label": first_wrong(labels),
                       "rpe": {"mc": m, "progress": progress, "step_labels": labels, "k": k, "pass_at_1": p1}})
    return result, dropped


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, help="Hugging Face checkpoint that writes the rollouts")
    ap.add_argument("--data", required=True, help="JSONL with problem, steps, answer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-pass", type=int, default=256, help="rollouts for Pass@1 = MC of the first state")
    ap.add_argument("--k-bands", default="0.1:128,0.5:64,1:32", help="K per later state by Pass@1: EDGE:K,...")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=4096, help="rollout length (GenPRM: the full solution)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from prmkern.llm import LLM

    llm = LLM(args.policy, dtype=args.dtype, device=args.device, seed=args.seed)
    out, dropped = label_records(llm, read_records(args.data), n_pass=args.n_pass, bands=parse_bands(args.k_bands),
                                 temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                                 threshold=args.threshold)
    with open(args.out, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"records": len(out), "dropped": len(dropped),
                      "rollouts": sum(r["rpe"]["k"] * (len(r["steps"]) - 1) for r in out),
                      "steps_labelled_wrong": sum(r["rpe"]["step_labels"].count(0) for r in out),
                      "solutions_all_correct": sum(r["label"] == -1 for r in out)}))
    return out


if __name__ == "__main__":
    main()
