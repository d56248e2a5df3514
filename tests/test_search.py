"""Best-of-N and beam search with generator and verifier on one engine; the weighted vote as a pure function."""
from __future__ import annotations

from prmkern import LLM, SamplingParams
from prmkern.verify.search import Candidate, beam_search, best_of_n, split_steps, weighted_vote
from prmkern.verify.protocols import Verifier, VerifyConfig


def test_weighted_vote_sums_scores_over_equivalent_answers():
    cands = [Candidate("", [], "1/2", 0.9), Candidate("", [], "\\frac{2}{4}", 0.3), Candidate("", [], "0.5", 0.3),
             Candidate("", [], "3", 0.95), Candidate("", [], None, 1.0)]
    chosen = weighted_vote(cands)
    assert chosen.answer == "1/2"  # 0.9 + 0.3 + 0.3 for one half beats 0.95 for 3; no answer never wins
    assert weighted_vote([Candidate("", [], None, 1.0)]) is None


def test_split_steps():
    assert split_steps("a = 1\n\n b = 2 \n\n\n\\boxed{2}") == ["a = 1", "b = 2", "\\boxed{2}"]


def test_best_of_n_and_beam_search_run_on_one_engine(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    verifier = Verifier(llm, VerifyConfig(num_chains=2, max_tokens=8))
    problems = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is 2 * 3?", "answer": "6"}]
    results = best_of_n(llm, verifier, problems, n=3, params=SamplingParams(max_tokens=12, seed=0), select="vote")
    for r in results:
        assert len(r.candidates) == 3 and r.correct in (True, False)
    scored = best_of_n(llm, verifier, problems[:1], n=3, params=SamplingParams(max_tokens=12, seed=0))
    assert scored[0].chosen is not None
    beam = beam_search(llm, verifier, "What is 1 + 1?", beam_width=2, expand=2, max_steps=2, step_tokens=8)
    assert 1 <= len(beam.candidates) <= 2 * 2 * 2 and beam.chosen in beam.candidates


def test_search_on_sessions_equals_reverification():
    """Beam search and best-of-N (pruned) on verification sessions choose what re-verifying every partial solution
    chooses (GenPRM, greedy: sessions equal whole-solution runs), for fewer verifier tokens."""
    import os

    import pytest

    from benchmarks.bench_search_sessions import VERIFIER, ReplayGenerator, fixed_output_runner
    if not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")):
        pytest.skip("no shipped verifier")
    problems = [{"problem": "What is $3 \\cdot 4 + 5$?",
                 "solution": "First, $3 \\cdot 4 = 12$.\n\nThen $12 + 5 = 17$.\n\nSo the answer is $\\boxed{17}$."}]
    out = {}
    for sessions in (False, True):
        llm = LLM(VERIFIER, device="cpu", dtype="float32")
        gen = ReplayGenerator(llm.tokenizer, problems, 3)
        verifier = Verifier(llm, VerifyConfig(format="genprm", scoring="exact", num_chains=1, temperature=0.0,
                                              max_tokens=24, max_code_rounds=1, code_runner=fixed_output_runner))
        beam = beam_search(gen, verifier, problems[0]["problem"], beam_width=2, expand=2, max_steps=3,
                           sessions=sessions)
        beam_tokens = llm.stats.generated_tokens
        bon = best_of_n(gen, verifier, problems, n=3, sessions=sessions, prune=sessions)
        out[sessions] = ([(c.text, c.score, c.step_scores) for c in beam.candidates], beam_tokens,
                         bon[0].chosen.text)
    assert out[True][0] == out[False][0] and out[True][2] == out[False][2]
    assert out[True][1] < out[False][1]
