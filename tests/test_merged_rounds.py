"""verify/merged_rounds.py: several verifiers on one engine, their rounds merged into one engine call each, give
what each verifier gives alone on a fresh engine, exactly (per-step chains, an early-exit watch (run alone), GenPRM's stages,
a discriminative PRM), in fewer engine calls."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from prmkern import LLM
from prmkern.verify.merged_rounds import verify_together
from prmkern.verify.protocols import Verifier, VerifyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")


def fake_runner(items):
    return [SimpleNamespace(status="ok", stdout=str(len(code)), stderr="") for _, code in items]


class Counting:
    """An LLM whose generate / reward calls are counted."""

    def __init__(self, llm):
        self._llm, self.calls = llm, 0

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate(self, *a, **k):
        self.calls += 1
        return self._llm.generate(*a, **k)

    def reward(self, *a, **k):
        self.calls += 1
        return self._llm.reward(*a, **k)


def rows(results, tok):
    return [r.to_json(tok, include_chains=True) for r in results]


@pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")), reason="no shipped verifier")
def test_merged_members_equal_each_alone():
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        records = [json.loads(line) for line in f][:2]
    records.append({"problem": "x", "steps": []})  # a malformed record fails alone, in every member
    configs = [VerifyConfig(format="prmkern", num_chains=2, temperature=0.7, max_tokens=120, seed=1),
               VerifyConfig(format="prmkern", num_chains=3, temperature=0.7, max_tokens=120, seed=2,
                            stop_at_first_error=True),  # rounds with an early-exit watch
               VerifyConfig(format="genprm", scoring="exact", num_chains=2, temperature=0.6, top_p=0.95, top_k=20,
                            max_tokens=40, max_code_rounds=1, code_runner=fake_runner, seed=3)]
    alone, calls_alone = [], 0
    for config in configs:
        llm = Counting(LLM(VERIFIER, device="cpu", dtype="float32"))
        alone.append(rows(Verifier(llm, config).verify(records), llm.tokenizer))
        calls_alone += llm.calls
    llm = Counting(LLM(VERIFIER, device="cpu", dtype="float32"))
    together = verify_together([Verifier(llm, c) for c in configs], records)
    assert [rows(r, llm.tokenizer) for r in together] == alone
    assert alone[0][2]["error"] and together[2][2].error == alone[2][2]["error"]
    assert llm.calls < calls_alone and llm.calls == max(1, llm.calls)


def test_merged_discriminative_members_equal_each_alone(tmp_path):
    from prmkern.tiny import build_prm_checkpoint
    path = build_prm_checkpoint(str(tmp_path / "prm"), seed=7)
    records = [{"problem": "What is 13 - 5 + 10?", "steps": ["13 minus 5 is 8.", "8 plus 10 is 19."]},
               {"problem": "What is 2 + 2?", "steps": ["2 + 2 = 4."]}]
    configs = [VerifyConfig(format="qwen-prm"), VerifyConfig(format="qwen-prm", method="last", threshold=0.4)]
    alone = []
    for config in configs:
        llm = LLM(path, device="cpu", dtype="float32")
        alone.append([r.to_json(llm.tokenizer) for r in Verifier(llm, config).verify(records)])
    llm = Counting(LLM(path, device="cpu", dtype="float32"))
    together = verify_together([Verifier(llm, c) for c in configs], records)
    got = [[r.to_json(llm.tokenizer) for r in res] for res in together]
    for g, a in zip(got, alone):
        for gr, ar in zip(g, a):
            assert gr["step_scores"] == pytest.approx(ar["step_scores"], abs=1e-6)
            assert gr["prediction"] == ar["prediction"]
    assert llm.calls == 1  # both members' solutions in one pooled pass
