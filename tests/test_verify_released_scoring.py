"""Scoring "released": the arithmetic of the engines the releases ran on, restated here independently and checked
against prmkern on log-probabilities the engine computes on a small random checkpoint.

References restated in this file (citations, not copies):
* SGLang RuntimeEndpoint.select (python/sglang/lang/backend/runtime_endpoint.py) as ThinkPRM's prm/thinkprm_api.py
  (mukhal/ThinkPRM 0beccfb) runs it: P = number of tokens of the state text s; each choice c is scored over the
  tokens of s + c from max(P - 2, 0): the mean of their prompt log-probabilities that are neither None nor 0.0,
  minus the first one when its text ends s; the score is softmax over the two means, index 0 ("yes").
* vLLM 0.7.1 V0 Sampler.forward (vllm/model_executor/layers/sampler.py): logits / temperature, then top-k (keep
  >= the k-th largest), then top-p (ascending sort, mask cumulative probability <= 1 - p except the largest),
  log_softmax; a logprobs=20 dict holds the 20 largest of those and the sampled token. GenPRM's
  get_reward_score (RyanLiu112/GenPRM 590bc94, genprm_inference.py): at the last occurrence of the decision token
  in the final round, p(Yes) / (p(Yes) + p(No)) from that dict, a missing label taking the dict's smallest
  probability, 0.5 when the denominator is 0.
"""
from __future__ import annotations

import math

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.verify.formats import GENPRM, THINKPRM
from prmkern.verify.processbench import load_processbench, sample_path
from prmkern.verify.protocols import Verifier, VerifyConfig
from prmkern.verify.released_scoring import (SGLANG_FAILED_SCORE, default_scoring, genprm_released_probability,
                                             sglang_select_score, vllm_v0_processed)


# -- independent restatements (float64) ---------------------------------------------------------------------------
def ref_select(choice_lps: list[list[float | None]], first_texts: list[str], state: str) -> float:
    means = []
    for lps, first in zip(choice_lps, first_texts):
        kept = [x for x in lps if x]
        mean = sum(kept) / len(kept)
        if state.endswith(first):
            mean = (mean * len(lps) - lps[0]) / (len(lps) - 1)
        means.append(mean)
    return 1.0 / (1.0 + math.exp(means[1] - means[0]))


def ref_vllm_v0(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Full-vocabulary processed log-probabilities, float64."""
    x = logits.double() / temperature
    srt, idx = x.sort(descending=False)
    kth = srt[x.numel() - top_k]
    srt = srt.masked_fill(srt < kth, -math.inf)
    cum = srt.softmax(-1).cumsum(-1)
    mask = cum <= 1 - top_p
    mask[-1] = False
    srt = srt.masked_fill(mask, -math.inf)
    out = torch.empty_like(srt).scatter_(0, idx, srt)
    return out.log_softmax(-1)


def ref_genprm(processed: torch.Tensor, decision: int, yes: int, no: int) -> float:
    listed = {int(t): float(processed[t]) for t in processed.topk(20).indices}
    listed[decision] = float(processed[decision])
    other = no if decision == yes else yes
    p_dec = math.exp(listed[decision])
    p_oth = math.exp(listed[other]) if other in listed else math.exp(min(listed.values()))
    py, pn = (p_dec, p_oth) if decision == yes else (p_oth, p_dec)
    return 0.5 if py + pn == 0 else py / (py + pn)


# -- the formulas on chosen numbers ----------------------------------------------------------------------------
def test_select_is_sigmoid_of_half_the_difference_and_full_when_question_mark_is_certain():
    a, b, q = -0.3, -1.7, -0.05
    got = sglang_select_score([[(q, "?"), (a, " yes")], [(q, "?"), (b, " no")]], "x correct? ")
    assert got == pytest.approx(1 / (1 + math.exp(-(a - b) / 2)), abs=1e-12)
    assert got == pytest.approx(ref_select([[q, a], [q, b]], ["?", "?"], "x correct? "), abs=1e-12)
    got0 = sglang_select_score([[(0.0, "?"), (a, " yes")], [(0.0, "?"), (b, " no")]], "x correct? ")
    assert got0 == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-12)
    # Nothing left to average: the release's except branch, softmax([0, 1])[0].
    assert sglang_select_score([[(0.0, "?"), (0.0, " yes")], [(0.0, "?"), (b, " no")]], "s") == SGLANG_FAILED_SCORE


@pytest.mark.parametrize("p_yes,expected", [(0.7, 0.804), (0.9, 1.0), (0.3, 0.196)])
def test_genprm_processed_reads_as_the_issue_says(p_yes, expected):
    vocab, yes, no = 64, 3, 5
    logits = torch.full((vocab,), -40.0, dtype=torch.float64)
    logits[yes], logits[no] = math.log(p_yes), math.log(1 - p_yes)
    raw = logits.log_softmax(-1)
    top = {int(t): float(raw[t]) for t in raw.topk(20).indices}
    proc = vllm_v0_processed(top, {yes: float(raw[yes]), no: float(raw[no])}, 0.6, 20, 0.95)
    got = genprm_released_probability(proc, sorted(top, key=lambda t: -top[t])[:20], yes, yes, no)
    assert got == pytest.approx(expected, abs=1e-3)
    assert got == pytest.approx(ref_genprm(ref_vllm_v0(logits, 0.6, 20, 0.95), yes, yes, no), abs=1e-9)


def test_maj8_example_flips_at_one_half():
    def released(p):
        return 1.0 if p >= 0.9 else (p ** (1 / 0.6)) / (p ** (1 / 0.6) + (1 - p) ** (1 / 0.6))
    scores = [0.9] * 3 + [0.3] * 5
    assert sum(released(p) for p in scores) / 8 == pytest.approx(0.498, abs=1e-3)  # < 0.5: an error
    assert sum(scores) / 8 == pytest.approx(0.525, abs=1e-3)  # exact: no error


def test_defaults_and_bad_values():
    assert [default_scoring(f) for f in ("thinkprm", "genprm", "critic", "prmkern")] == \
        ["released", "released", "released", "exact"]
    assert VerifyConfig(format="genprm").scoring == "released"
    with pytest.raises(ValueError, match="scoring='exactly' is invalid; accepted: released | exact"):
        VerifyConfig(format="genprm", scoring="exactly")
    with pytest.raises(ValueError, match="needs top_k >= 1"):
        VerifyConfig(format="genprm", top_k=-1)
    assert VerifyConfig(format="genprm", top_k=-1, scoring="exact").top_k == -1


# -- against the engine's log-probabilities on a random checkpoint ---------------------------------------------
@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, device="cpu")


def test_thinkprm_released_verdict_is_sglang_select_on_transformers_logits(llm, qwen2_dir):
    from tests.conftest import hf_model
    recs = load_processbench(sample_path())[:2]
    res = Verifier(llm, VerifyConfig(format="thinkprm", num_chains=2, temperature=1.0, max_tokens=12)).verify(recs)
    tok = llm.tokenizer
    model = hf_model(qwen2_dir)
    n = 0
    for r, rec in zip(res, recs):
        assert r.error is None and r.scoring == "released" and r.to_json(tok, False)["scoring"] == "released"
        prompt = THINKPRM.render(rec["problem"], rec["steps"], tok)
        for ch in r.chains:
            state = prompt + tok.decode(ch.turns[0].token_ids, skip_special_tokens=True)
            assert state.endswith("\nIs the solution correct? ")
            P = len(tok.encode(state, add_special_tokens=True))
            start = max(P - 2, 0)
            lps, firsts = [], []
            for c in ("yes", "no"):
                ids = tok.encode(state + c, add_special_tokens=True)
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                lps.append([float(logp[j - 1, ids[j]]) for j in range(start, len(ids))])
                firsts.append(tok.decode([ids[start]]))
            assert ch.final == pytest.approx(ref_select(lps, firsts, state), abs=1e-4)
            n += 1
        assert r.scores.score == pytest.approx(sum(ch.final for ch in r.chains) / 2, abs=1e-12)
    assert n == 4


def test_genprm_released_score_is_vllm_v0_on_transformers_logits(llm, qwen2_dir):
    """A sampled round with the release's settings; the token at a position plays the decision word. prmkern's
    released score (from the engine's raw top-20 and label log-probabilities) equals the release's formula on the
    full-vocabulary processed distribution computed from transformers' logits."""
    from prmkern.verify import genprm_protocol as G
    from tests.conftest import hf_model
    tok = llm.tokenizer
    prompt = tok.encode(GENPRM.render("What is 2 + 3?", ["2 + 3 = 5."], tok, paragraph=0), add_special_tokens=False)
    cfg = VerifyConfig(format="genprm", temperature=0.6, top_p=0.95, top_k=20)
    model = hf_model(qwen2_dir)
    checked = 0
    for seed in range(6):
        o = llm.generate([prompt], SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=6, seed=seed,
                                                  logprobs=20, logprob_token_ids=[7, 11]))[0].outputs[0]
        pos = len(o.token_ids) - 1
        decision = o.token_ids[pos]
        other = 7 if decision != 7 else 11
        # Fresh engine call with the decision and the other label as the chosen ids.
        o2 = llm.generate([prompt], SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=6, seed=seed,
                                                   logprobs=20, logprob_token_ids=[decision, other]))[0].outputs[0]
        assert o2.token_ids == o.token_ids
        v = Verifier(llm, cfg)
        v.verdict_ids = (decision, other)
        j = G._Judgement("x")
        j.text = "**Judgement**: $\\boxed{Yes}$\n</output>\n"
        j.final_ids = list(o2.token_ids)
        j.final_logprobs = list(o2.token_logprobs)
        j.final_top = [{t: lp.logprob for t, lp in d.items()} for d in o2.logprobs]
        got, source = G._paragraph_score(v, j)
        last = len(j.final_ids) - 1 - j.final_ids[::-1].index(decision)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(o2.token_ids[:last])])).logits[0, -1]
        ref = ref_genprm(ref_vllm_v0(logits, 0.6, 20, 0.95), decision, decision, other)
        assert source == "released" and got == pytest.approx(ref, abs=1e-4)
        checked += 1
    assert checked == 6


def test_genprm_undecided_judgement(llm):
    """A judgement cut before its decision: exact leaves the step unscored (prediction None); released retries the
    verdict-only round as the release does and, when it never ends, drops the record as the release would."""
    rec = {"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5."]}
    exact = Verifier(llm, VerifyConfig(format="genprm", max_tokens=8, scoring="exact")).verify([rec])[0]
    assert exact.error is None and exact.scores.steps[0].score is None and exact.scores.steps[0].coverage == 0.0
    assert exact.prediction is None and exact.scores.unscored_steps == [0]
    released = Verifier(llm, VerifyConfig(format="genprm", max_tokens=8)).verify([rec])[0]
    from prmkern.verify.genprm_protocol import RELEASED_DEGRADED_TRIES
    assert released.error is not None and "retries it without end" in released.error
    assert released.prediction is None and released.to_json(llm.tokenizer, False)["scoring"] == "released"
    assert str(RELEASED_DEGRADED_TRIES) in released.error


def test_genprm_released_no_decision_scores_half_and_missing_token_drops():
    from prmkern.verify import genprm_protocol as G

    class V:
        released, verdict_ids = True, (7, 11)
        fmt, config = GENPRM, VerifyConfig(format="genprm")
    j = G._Judgement("x")
    j.text, j.final_ids = "no verdict here</output>\n", [1, 2]
    assert G._paragraph_score(V, j) == (0.5, "no_decision")
    j.text = "$\\boxed{Yes}$</output>\n"  # "Yes}" found, but token 7 was not generated in the final round
    with pytest.raises(G._Dropped, match="raises ValueError"):
        G._paragraph_score(V, j)
    V.released = False
    assert G._paragraph_score(V, G._Judgement("no decision"))[0] is None


def test_thinkprm_best_of_n_wording_follows_the_release(llm):
    """test_time_compute.py L59 runs best-of-N with process_verifier=False: thinkprm_api.py then writes the steps
    without "Step i:" (step_string "") and adds no step stop; its score() splits a candidate on "Step \\d+:"."""
    released = Verifier(llm, VerifyConfig(format="thinkprm")).for_best_of_n()
    steps = released.best_of_n_steps("## Step 1: Add 2 and 3.\n\n## Step 2: That is 5.\n")
    assert steps == ["Add 2 and 3.", "That is 5."]
    text = released.fmt.render("What is 2 + 3?", steps, llm.tokenizer)
    assert "Add 2 and 3.\nThat is 5." in text and "Step 1:" not in text
    assert released.stops(text, 2) == released.fmt.stops(2) == tuple(THINKPRM.stop)
    exact = Verifier(llm, VerifyConfig(format="thinkprm", scoring="exact"))
    assert exact.for_best_of_n() is exact and exact.best_of_n_steps("Step 1: a") is None
    assert "Step 1: Add 2 and 3." in exact.fmt.render("What is 2 + 3?", steps, llm.tokenizer)
    # The release's stop for process verification: the lexicographic maximum of the prompt's step numbers + 1.
    ten = [f"s{i}" for i in range(10)]
    prompt = THINKPRM.render("p", ten, llm.tokenizer)
    assert Verifier(llm, VerifyConfig(format="thinkprm")).stops(prompt, 10)[-1] == "Step 10:"
    assert exact.stops(prompt, 10)[-1] == "Step 11:"
