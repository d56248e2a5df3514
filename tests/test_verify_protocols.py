"""The verifier protocols through the real engine: one prefill per prompt for K chains, budget forcing and the
GenPRM code loop resubmitting token ids so only new tokens are recomputed, and per-record failures."""
from __future__ import annotations

import dataclasses

import pytest

from prmkern import LLM, SamplingParams
from prmkern.verify.formats import GENPRM, PRMKERN, THINKPRM
from prmkern.verify.processbench import load_processbench, sample_path
from prmkern.verify.protocols import Verifier, VerifyConfig


@pytest.fixture(scope="module")
def records():
    return load_processbench(sample_path())[:3]


def greedy_text(llm: LLM, prompt_text: str, n: int = 40) -> str:
    ids = llm.tokenizer.encode(prompt_text, add_special_tokens=False)
    return llm.generate([ids], SamplingParams(temperature=0, max_tokens=n))[0].outputs[0].text


def test_k_chains_prefill_each_prompt_once(qwen2_dir, records):
    llm = LLM(qwen2_dir, device="cpu")
    verifier = Verifier(llm, VerifyConfig(format="prmkern", num_chains=8, max_tokens=16))
    results = verifier.verify(records)
    prompt_lens = [len(llm.tokenizer.encode(PRMKERN.render(r["problem"], r["steps"], llm.tokenizer),
                                            add_special_tokens=False)) for r in records]
    s = llm.stats
    assert s.prompt_tokens == sum(prompt_lens)
    assert s.prefill_tokens + s.cached_tokens == sum(prompt_lens)  # once per prompt, not once per chain
    assert 3 * 8 <= s.generated_tokens <= 3 * 8 * 16
    for res, rec in zip(results, records):
        assert res.error is None and len(res.chains) == 8
        # A random model writes no verdicts: every step is reported missing, nothing is scored silently.
        assert res.scores.counts["missing"] == 8 * len(rec["steps"])
        assert res.scores.score is None and res.prediction is None


def test_bad_record_fails_alone(qwen2_dir, records):
    llm = LLM(qwen2_dir, device="cpu")
    results = Verifier(llm, VerifyConfig(num_chains=2, max_tokens=4)).verify(
        [records[0], {"problem": "x", "steps": []}, {"steps": ["a"]}, records[1]])
    assert results[0].error is None and results[3].error is None and len(results[3].chains) == 2
    assert "non-empty list" in results[1].error and "'problem'" in results[2].error


def test_budget_forcing_continues_and_recomputes_only_new_tokens(qwen2_dir, records):
    llm = LLM(qwen2_dir, device="cpu")
    rec = records[0]
    prompt_text = PRMKERN.render(rec["problem"], rec["steps"], llm.tokenizer)
    text = greedy_text(llm, prompt_text)
    stop = text[6:10]  # a string the greedy chain writes early: it plays the end-of-thinking marker
    fmt = dataclasses.replace(PRMKERN, name="prmkern-test-stop", stop=(stop,))
    cfg = VerifyConfig(format=fmt, num_chains=1, temperature=0, max_tokens=60, budget_tokens=40,
                       continuation=" Wait, check again:", max_forcing_rounds=2)
    llm.reset_stats()
    res = Verifier(llm, cfg).verify([rec])[0]
    chain = res.chains[0]
    assert chain.forced_rounds >= 1
    prompt_len = len(llm.tokenizer.encode(prompt_text, add_special_tokens=False))
    cont_len = len(llm.tokenizer.encode(cfg.continuation, add_special_tokens=False))
    # Each forcing round recomputes at most one partial block (16) + the re-encoded stop tail + the continuation.
    assert llm.stats.prefill_tokens <= prompt_len + chain.forced_rounds * (16 + 8 + cont_len)
    assert " Wait, check again:" in llm.tokenizer.decode(chain.turns[0].token_ids)


def test_genprm_code_loop_runs_code_and_resumes(qwen2_dir, records):
    llm = LLM(qwen2_dir, device="cpu")
    rec = dict(records[0], steps=records[0]["steps"][:2])
    # Stops the random model writes under greedy decoding play "</analyze>\n" and "\n```\n"; the code regex takes a
    # fixed, harmless program, so the sandbox round trip is exercised for real.
    prompt = GENPRM.render(rec["problem"], rec["steps"], llm.tokenizer, paragraph=0)
    analysis = greedy_text(llm, prompt)
    stop1 = analysis[4:8]
    stage2 = greedy_text(llm, prompt + analysis[:analysis.index(stop1) + len(stop1)] + GENPRM.verify_prefix)
    code_stop = stage2[4:8]
    fmt = dataclasses.replace(GENPRM, name="genprm-test", analyze_stop=(stop1,), code_stop=(code_stop, "</output>\n"),
                              code_regex=r"(?P<code>)")
    cfg = VerifyConfig(format=fmt, num_chains=2, temperature=0, max_tokens=120, max_code_rounds=1)
    llm.reset_stats()
    res = Verifier(llm, cfg).verify([rec])[0]
    assert res.error is None and len(res.chains) == 2
    runs = [r for ch in res.chains for r in ch.code_runs]
    assert runs and all(r["status"] == "ok" for r in runs)
    for ch in res.chains:
        assert len(ch.turns) == 2  # one assistant turn per paragraph
        t = ch.turns[0].text
        # Out of rounds without "</output>\n": degraded, as released, to the analysis + the verdict opener.
        assert t.startswith(GENPRM.prefix(0)) and GENPRM.output_prefix in t
    assert res.scores is not None and len(res.scores.steps) == 2
    # Every round resubmits the whole conversation; the prefix cache serves all but the new tail.
    assert llm.stats.prefill_tokens < 0.4 * llm.stats.prompt_tokens, llm.stats


def test_append_text_keeps_generated_tokens_before_a_stop_string(qwen2_dir):
    from prmkern.outputs import CompletionOutput
    from prmkern.verify.protocols import Turn
    llm = LLM(qwen2_dir, device="cpu")
    tok = llm.tokenizer
    verifier = Verifier(llm, VerifyConfig(num_chains=1))
    body = "Step 1: the step is \\boxed{correct}"
    stop = " so"
    ids = tok.encode(body + stop + " then stop", add_special_tokens=False)
    # The engine's text for a round that stopped at `stop`: everything before its first occurrence.
    out = CompletionOutput(0, body, ids, token_logprobs=[{7: -1.0} for _ in ids], finish_reason="stop",
                           stop_reason=stop)
    turn = Turn(prompt_ids=[1])
    verifier._absorb(turn, out)
    verifier._append_text(turn, " Wait,", drop_stop=True)
    text = tok.decode(turn.token_ids)
    assert text == body + " Wait,"
    kept = sum(1 for lp in turn.token_logprobs if lp)
    body_ids = tok.encode(body, add_special_tokens=False)
    assert kept >= len(body_ids) - 1 and turn.token_ids[:kept] == ids[:kept]


def test_thinkprm_final_verdict_matches_transformers(qwen2_dir, records):
    """The forced final verdict through the real engine equals P(yes) / (P(yes) + P(no)) computed by Hugging Face
    transformers on the same tokens (the chain, its stop cut, then "\\nIs the solution correct? ")."""
    import torch

    from tests.conftest import hf_model
    llm = LLM(qwen2_dir, device="cpu")
    res = Verifier(llm, VerifyConfig(format="thinkprm", num_chains=2, temperature=1.0, max_tokens=12,
                                     scoring="exact")).verify(
        records[:2])
    tok = llm.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    model = hf_model(qwen2_dir)
    finals = []
    for r in res:
        for ch in r.chains:
            turn = ch.turns[0]
            ids = turn.prompt_ids + turn.token_ids[:-1]  # the last token is the decision the engine wrote
            assert tok.decode(ids).endswith("\nIs the solution correct? ")
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            ref = float(torch.softmax(lp[[yes, no]], -1)[0])
            assert ch.final == pytest.approx(ref, abs=1e-4)
            finals.append(ref)
        assert r.scores.score == pytest.approx(sum(finals[-2:]) / 2, abs=1e-4) and r.scores.method == "final"
