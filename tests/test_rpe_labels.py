"""RPE labels as GenPRM defines them, with a scripted policy whose rollouts from each state have known outcomes:
Pass@1 of the first state from the large sample, problems with all-correct or all-wrong samples dropped, K by the
Pass@1 band, T=0.7, and the labels P_t = MC(s_{t+1}) / MC(s_t) >= 0.8 with everything after a dead state wrong."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
import rpe_labels  # noqa: E402

from prmkern.outputs import CompletionOutput, RequestOutput  # noqa: E402


class Tok:
    chat_template = None


class Policy:
    """wins[(problem, t)] = the share of rollouts from state s_t that reach the answer."""

    def __init__(self, wins):
        self.tokenizer, self.wins, self.calls = Tok(), wins, []

    def generate(self, prompts, params):
        outs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.calls.append((prompt, p))
            problem = prompt.split("user: ")[1].split("\n")[0]
            t = prompt.split("assistant: ")[1].count("Step ")  # the steps already written
            right = round(self.wins[(problem, t)] * p.n)
            texts = ["so \\boxed{7}" if j < right else "so \\boxed{8}" for j in range(p.n)]
            outs.append(RequestOutput(i, prompt, [], [CompletionOutput(index=j, text=x, token_ids=[], finish_reason="stop")
                                                      for j, x in enumerate(texts)]))
        return outs


def rec(problem, n_steps, final_right=True):
    steps = [f"Step {i + 1}: work." for i in range(n_steps - 1)] + [f"Step {n_steps}: \\boxed{{{7 if final_right else 8}}}"]
    return {"problem": problem, "steps": steps, "answer": "7"}


def test_pass_at_1_drop_bands_and_labels():
    wins = {("A", 0): 0.5, ("A", 1): 0.5, ("A", 2): 0.25,  # P = 1.0, 0.5 (< 0.8), then the final step
            ("B", 0): 1.0, ("B", 1): 1.0,  # every rollout right: dropped
            ("C", 0): 0.0, ("C", 1): 0.0,  # every rollout wrong: dropped
            ("D", 0): 0.05, ("D", 1): 0.0, ("D", 2): 0.5}  # hard problem: K=128; a dead state at s_1
    recs = [rec("A", 3), rec("B", 2), rec("C", 2), rec("D", 3, final_right=False)]
    policy = Policy(wins)
    kept, dropped = rpe_labels.label_records(policy, recs, n_pass=40, max_tokens=100)
    assert [d["problem"] for d in dropped] == ["B", "C"] and "Pass@1 = 1.0 over 40" in dropped[0]["rpe_dropped"]
    a, d = kept
    # Pass@1 comes from the n_pass sample of the first state; later states use K by band.
    pass_calls = [p for _, p in policy.calls if p.n == 40]
    assert len(pass_calls) == 4 and all(p.temperature == 0.7 and p.max_tokens == 100 for _, p in policy.calls)
    assert a["rpe"]["k"] == 32 and d["rpe"]["k"] == 128 and {p.n for _, p in policy.calls} == {40, 32, 128}
    assert a["rpe"]["mc"] == [0.5, 0.5, 0.25, 1.0]
    assert a["rpe"]["progress"] == [1.0, 0.5, 4.0] and a["rpe"]["step_labels"] == [1, 0, 1] and a["label"] == 1
    assert d["rpe"]["mc"] == [0.05, 0.0, 0.5, 0.0]
    assert d["rpe"]["progress"] == [0.0, None, None] and d["rpe"]["step_labels"] == [0, 0, 0] and d["label"] == 0


def test_bands_and_rules():
    assert [rpe_labels.rollouts_for(p) for p in (0.0, 0.09, 0.1, 0.49, 0.5, 0.99)] == [128, 128, 64, 64, 32, 32]
    assert rpe_labels.parse_bands("0.2:100,1:10") == ((0.2, 100), (1.0, 10))
    for bad in ("0.5:64", "1:32,0.5:64", "x", "0.5:0,1:3"):
        with pytest.raises(ValueError):
            rpe_labels.parse_bands(bad)
    with pytest.raises(ValueError, match="answer"):
        rpe_labels.label_records(Policy({}), [{"problem": "p", "steps": ["a"]}])
    with pytest.raises(ValueError, match="n_pass"):
        rpe_labels.label_records(Policy({}), [rec("A", 2)], n_pass=1)
