"""Step labels by Relative Progress Estimation (GenPRM's recipe), with Monte-Carlo rollouts through the engine.

    python train/rpe_labels.py --policy some-checkpoint/ --data solutions.jsonl --k 8 --out labelled.jsonl

For a solution with steps a_0..a_{n-1}, state s_t is the problem plus the first t steps. MC(s_t) is the share of K
rollouts from s_t (the policy continues the solution to a final answer) whose answer prmkern.grading judges equal to
the record's `answer`; MC(s_t, a_t) = MC(s_{t+1}), and MC(s_n) is whether the solution's own final answer is right
(no rollout needed). The relative progress of step t is P_t = MC(s_t, a_t) / MC(s_t); step t is labelled correct iff
P_t >= 0.8, and every step from the first state with MC = 0 on is labelled wrong (`rpe_step_labels`). The K rollouts
of one state are one request with SamplingParams(n=K), so they share the state's KV, and successive states of one
solution share the problem and earlier steps through the prefix cache.

Output: the input record plus `rpe` = {mc: [MC(s_0)..MC(s_n)], progress: [P_t or null], step_labels: [1/0 per step]}
and `label` set to the first step labelled wrong (-1 if none), so the file is ProcessBench-shaped for SFT data,
the discriminative baseline or train/synthesize_chains.py.

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


def label_records(llm, records: list[dict], *, k: int, temperature: float, max_tokens: int, seed: int,
                  threshold: float = 0.8) -> list[dict]:
    """RPE labels for every record (needs `problem`, `steps`, `answer`)."""
    from prmkern.grading import grade
    from prmkern.sampling import SamplingParams

    prompts, where = [], []
    for ri, r in enumerate(records):
        for key in ("problem", "steps", "answer"):
            if key not in r:
                raise ValueError(f"record {r.get('id', ri)} lacks {key!r}; RPE needs problem, steps and answer")
        for t in range(len(r["steps"])):  # states s_0 .. s_{n-1}; s_n is graded directly
            prompts.append(rollout_prompt(llm.tokenizer, r["problem"], r["steps"][:t]))
            where.append((ri, t))
    outs = llm.generate(prompts, SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed))
    mc = [[0.0] * (len(r["steps"]) + 1) for r in records]
    for (ri, t), out in zip(where, outs):
        if out.error:
            raise RuntimeError(f"rollouts for record {ri} state {t} failed: {out.error}")
        prefix = "\n".join(s.strip() for s in records[ri]["steps"][:t])
        wins = sum(grade(prefix + "\n" + c.text, records[ri]["answer"]) for c in out.outputs)
        mc[ri][t] = wins / len(out.outputs)
    result = []
    for r, m in zip(records, mc):
        m[-1] = float(grade("\n".join(r["steps"]), r["answer"]))
        progress, labels = rpe_step_labels(m, threshold)
        result.append({**r, "label": first_wrong(labels),
                       "rpe": {"mc": m, "progress": progress, "step_labels": labels}})
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, help="Hugging Face checkpoint that writes the rollouts")
    ap.add_argument("--data", required=True, help="JSONL with problem, steps, answer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from prmkern.llm import LLM

    llm = LLM(args.policy, dtype=args.dtype, device=args.device, seed=args.seed)
    out = label_records(llm, read_records(args.data), k=args.k, temperature=args.temperature,
                        max_tokens=args.max_tokens, seed=args.seed, threshold=args.threshold)
    with open(args.out, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"records": len(out), "rollouts": sum(len(r["steps"]) for r in out) * args.k,
                      "steps_labelled_wrong": sum(r["rpe"]["step_labels"].count(0) for r in out),
                      "solutions_all_correct": sum(r["label"] == -1 for r in out)}))
    return out


if __name__ == "__main__":
    main()
