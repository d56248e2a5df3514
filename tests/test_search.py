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
