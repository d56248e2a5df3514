"""What an audit of the search API found on 2026-12-07, each a case that misbehaved before its fix: best-of-N and
beam search swallowed errors (a problem whose solutions could not be generated came back with no candidates and no
reason, `prmkern bon` wrote `"error": null` and counted it as a success; beam search scored unverifiable proposals
0.0 and chose one), bad arguments failed deep inside, and a lone surrogate in a problem or a step crashed the
tokenizer for its whole batch (in a session, after the step was recorded, closing the session). Then: on
verification sessions one verifier prompt past the context failed the whole best-of-N batch, and select='vote' with
no answer to count chose nothing."""
from __future__ import annotations

import json

import pytest

from prmkern import SamplingParams
from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.verify.protocols import Verifier, VerifyConfig
from prmkern.verify.search import STEP_DELIMITER, VOTE_FALLBACK, beam_search, best_of_n
from tests.test_cli import run_cli, write_lines

PROBLEM = "Compute $13 - 5 + 10$."
TOO_LONG = "1 + 1 " * 2000  # past the shipped verifier's 1,024-token context
PARAMS = SamplingParams(temperature=0.8, max_tokens=24, seed=1)


class FixedGenerator:
    """A generator whose candidates are given: texts[r] are the solutions of the r-th prompt of each call."""

    def __init__(self, tokenizer, texts: list[list[str]]):
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts, params, use_tqdm=False):
        return [RequestOutput(str(r), None, list(prompt),
                              [CompletionOutput(j, t, self.tokenizer.encode(t, add_special_tokens=False),
                                                finish_reason="stop") for j, t in enumerate(self.texts[r])])
                for r, prompt in enumerate(prompts)]


@pytest.fixture(scope="module")
def verifier(shipped_llm):
    return Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=1, max_tokens=48, seed=1))


def test_best_of_n_gives_a_problem_it_cannot_run_its_reason(shipped_llm, verifier):
    results = best_of_n(shipped_llm, verifier, [{"problem": PROBLEM}, {"problem": TOO_LONG}], n=2, params=PARAMS)
    assert results[0].error is None and len(results[0].candidates) == 2 and results[0].chosen is not None
    assert results[1].error is not None and "generating its solutions failed" in results[1].error
    assert results[1].chosen is None and results[1].candidates == []


@pytest.mark.parametrize("problems,error", [
    ("Compute 2 + 2.", TypeError), ([{"question": PROBLEM}], TypeError), ([{"problem": 5}], TypeError),
    ([{"problem": "  "}], ValueError), ([{"problem": "a \ud800 b"}], ValueError),
])
def test_best_of_n_refuses_bad_problems_before_anything_runs(shipped_llm, verifier, problems, error):
    tokens = shipped_llm.engine.stats.generated_tokens
    with pytest.raises(error, match="problem"):
        best_of_n(shipped_llm, verifier, problems, n=2, params=PARAMS)
    assert shipped_llm.engine.stats.generated_tokens == tokens


@pytest.mark.parametrize("kwargs,error", [
    ({"problem": 5}, TypeError), ({"problem": "a \udc80 b"}, ValueError), ({"beam_width": 1.5}, ValueError),
    ({"max_steps": True}, ValueError), ({"expand": "2"}, ValueError), ({"seed": "x"}, ValueError),
])
def test_beam_search_refuses_bad_arguments_by_name(shipped_llm, verifier, kwargs, error):
    args = {"problem": PROBLEM, "beam_width": 2, "expand": 2, "max_steps": 1, "step_tokens": 16, **kwargs}
    with pytest.raises(error, match=next(iter(kwargs))):
        beam_search(shipped_llm, verifier, **args)


def test_beam_search_does_not_score_what_it_could_not_verify(shipped_llm, verifier):
    # the solver's prompt fits the context, the verifier's leaves no room for a verdict: nothing is scored, and the
    # candidates say so (before: 0.0 each, one of them "chosen" by that score)
    problem = "1+1 " * 230
    res = beam_search(shipped_llm, verifier, problem, beam_width=2, expand=2, max_steps=1, step_tokens=8)
    assert res.candidates and all(c.score is None for c in res.candidates), [c.score for c in res.candidates]
    assert res.chosen is res.candidates[0]  # none scored: the first, as best_of_n's select_by_score


def test_a_surrogate_fails_its_record_alone_and_leaves_a_session_open(shipped_llm, verifier):
    out = verifier.verify([{"problem": "a \ud800 b", "steps": ["x"]}, {"problem": PROBLEM, "steps": ["13 - 5 = 8."]}])
    assert out[0].error is not None and "lone surrogate" in out[0].error
    assert out[1].error is None and out[1].scores is not None
    session = verifier.open(PROBLEM)
    try:
        session.add_step("13 minus 5 is 8.")
        with pytest.raises(ValueError, match="lone surrogate"):
            session.add_step("8 \udc80 plus")
        assert not session.closed and session.steps == ["13 minus 5 is 8."]
        with pytest.raises(ValueError, match="lone surrogate"):
            verifier.open("a \ud800 b")
    finally:
        session.close()


def test_bon_rows_carry_the_error_and_count_as_failed(tmp_path):
    src = write_lines(tmp_path / "p.jsonl", [{"problem": "Compute 2 + 2.", "answer": "4"}, {"problem": TOO_LONG},
                                             {"problem": "   "}])
    out, summary = tmp_path / "bon.jsonl", tmp_path / "s.json"
    proc = run_cli("bon", src, "--n", "2", "--gen-max-tokens", "16", "--max-tokens", "16", "--chains", "1",
                   "--select", "vote", "--device", "cpu", "--no-progress", "-o", str(out), "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["error"] is None and len(rows[0]["candidates"]) == 2
    assert all(c["error"] is None for c in rows[0]["candidates"])
    # vote: a choice always, and the row says when there was no answer to count
    assert rows[0]["chosen"] is not None
    assert (rows[0]["note"] == VOTE_FALLBACK) == all(c["answer"] is None for c in rows[0]["candidates"])
    assert rows[1]["error"] is not None and "generating its solutions failed" in rows[1]["error"]
    assert "'problem' is empty" in rows[2]["error"]  # fails alone, not its batch (best_of_n refuses it)
    s = json.loads(summary.read_text())
    assert s["failed"] == 2 and s["succeeded"] == 1, s


@pytest.mark.parametrize("sessions", [False, True])
def test_a_verifier_prompt_past_the_context_fails_its_candidate_alone(shipped_llm, sessions):
    # problem 1's second candidate has a step past the 1,024-token context, problem 2's text is: before, on
    # sessions, the first add_steps raised for the whole batch; now both paths report it per candidate and problem
    ok = "13 - 5 = 8.\n\n8 + 10 = 18.\n\nSo the answer is \\boxed{18}."
    problems = [{"problem": PROBLEM, "answer": "18"}, {"problem": PROBLEM}, {"problem": PROBLEM + " 1 + 1" * 600}]
    texts = [[ok, "13 - 5 = 8.\n\n\\boxed{8}"], [ok, "13 - 5 = 8.\n\n" + TOO_LONG + "\n\n\\boxed{18}"],
             [ok, ok]]
    verifier = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=2, max_tokens=96, seed=1))
    res = best_of_n(FixedGenerator(shipped_llm.tokenizer, texts), verifier, problems, n=2, sessions=sessions)
    fits = [[True, True], [True, False], [False, False]]
    for r, expect in zip(res, fits):
        for c, fit in zip(r.candidates, expect):
            if fit:
                assert c.score is not None and c.error is None, (sessions, c.error)
            else:  # the engine's reason: the verifier's prompt and the context it is past
                assert c.score is None and "prompt has" in c.error and "max_model_len" in c.error, c.error
    assert res[0].error is None and res[0].correct is True and res[1].error is None
    assert res[1].chosen is res[1].candidates[0]
    assert res[2].error.startswith("no candidate could be verified: ") and "max_model_len" in res[2].error
    assert not shipped_llm.engine.has_unfinished()


def test_vote_without_answers_falls_back_to_the_score(shipped_llm, verifier):
    texts = [["13 - 5 = 8.\n\n8 + 10 = 18.", "13 - 5 = 9.\n\n9 + 10 = 19.", "13 - 5 = 8."],
             ["13 - 5 = 8.\n\n\\boxed{18}", "13 - 5 = 9.\n\n9 + 10 = 19."]]
    problems = [{"problem": PROBLEM, "answer": "18"}, {"problem": PROBLEM}]
    res = best_of_n(FixedGenerator(shipped_llm.tokenizer, texts), verifier, problems, n=3, select="vote")
    none, one = res
    assert all(c.answer is None for c in none.candidates)
    scores = [c.score for c in none.candidates]
    assert None not in scores and none.chosen is none.candidates[scores.index(max(scores))]
    assert none.note == VOTE_FALLBACK and "vote" in none.note and none.error is None and none.correct is False
    assert one.note is None and one.chosen.answer == "18"  # one answer to count: the vote chooses as before


class StepGenerator:
    """A generator whose every prompt proposes the given steps, each ended at the step delimiter (not final)."""

    def __init__(self, tokenizer, steps: list[str]):
        self.tokenizer, self.steps = tokenizer, steps

    def generate(self, prompts, params, use_tqdm=False):
        return [RequestOutput(str(r), None, list(prompt),
                              [CompletionOutput(j, t, self.tokenizer.encode(t, add_special_tokens=False),
                                                finish_reason="stop", stop_reason=STEP_DELIMITER)
                               for j, t in enumerate(self.steps)])
                for r, prompt in enumerate(prompts)]


def test_beam_search_on_sessions_drops_a_beam_whose_session_failed(shipped_llm, verifier):
    # one proposal's verifier prompt is past the context: its session fails alone and closes, and no beam goes on
    # from it (before: the closed session was kept as a beam, and forking it raised and failed the whole search)
    gen = StepGenerator(shipped_llm.get_tokenizer(), ["13 - 5 = 8.", TOO_LONG])
    res = beam_search(gen, verifier, PROBLEM, beam_width=2, expand=2, max_steps=2, step_tokens=8, sessions=True)
    assert res.chosen is not None and res.chosen.score is not None
    assert res.chosen.steps == ["13 - 5 = 8.", "13 - 5 = 8."]
    assert all(TOO_LONG not in c.steps[:-1] for c in res.candidates)  # no beam grew from the failed one
