"""The released verifiers, prompt for prompt and number for number.

Prompts are rendered through a locally built Qwen2 byte-level BPE tokenizer carrying an R1-Distill-style chat template
(bos, system text, "<｜User｜>", "<｜Assistant｜>" ... "<｜end▁of▁sentence｜>", generation prompt "<｜Assistant｜><think>\\n")
and compared with literals written out here from the released code (ThinkPRM utils/helper.py, GenPRM prm_evaluate.py +
util.build_prompt and its demo notebook's printed prompt, ProcessBench critique_template.txt + run_eval.py). The
protocols run on a scripted LLM (returns given texts and log-probabilities) and their scores are compared with the
released formulas written out independently here (numpy softmax over the two labels, GenPRM's get_reward_score).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.verify import CRITIC, GENPRM, THINKPRM, format_defaults, released_prompts as R
from prmkern.verify.protocols import Verifier, VerifyConfig

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def r1tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from prmkern.tiny import build_tokenizer
    path = str(tmp_path_factory.mktemp("r1tok"))
    build_tokenizer(path, 1024)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS,
                            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = R1_TEMPLATE
    return tok


PROBLEM = "What is $(2+2)\\cdot 3$? {solution} stays literal."
STEPS = ["Step 1: Add: $2 + 2 = 4$. ", "Multiply: $4 \\cdot 3 = 13$.", "So the answer is $\\boxed{13}$."]


def test_every_released_string_has_its_source():
    names = [n for n in R.__all__ if n.isupper() and n != "SOURCES"]
    assert set(names) == set(R.SOURCES)
    for n in names:
        repo, commit, path = R.source(n)
        assert repo in ("mukhal/ThinkPRM", "RyanLiu112/GenPRM", "QwenLM/ProcessBench",
                        "Qwen/Qwen2.5-Math-PRM-7B") and commit and path


def test_thinkprm_prompt_byte_for_byte(r1tok):
    solution = "Step 1: Add: $2 + 2 = 4$.\nStep 2: Multiply: $4 \\cdot 3 = 13$.\nStep 3: So the answer is $\\boxed{13}$."
    # helper.py fills with str.replace, {problem} first: a "{solution}" inside the problem is replaced too.
    expected = (
        BOS + "<｜User｜>You are given a math problem and a proposed step-by-step solution:\n\n[Math Problem]\n\n"
        + PROBLEM.replace("{solution}", solution) + "\n\n[Solution]\n\n" + solution + "\n\nReview and critique each step in the proposed solution to determine "
        "whether each step is correct. If the solution is incomplete, only verify the provided steps."
        "<｜Assistant｜><think>\n\nLet's verify step by step:")
    assert THINKPRM.render(PROBLEM, STEPS, r1tok) == expected
    assert THINKPRM.stops(3) == ("Is the solution correct?", "</think>", "Step 4:")


def test_genprm_conversation_byte_for_byte(r1tok):
    hist = ["<analyze>\nLet's analyze the Paragraph 1 step by step: fine.\n</analyze>\n<verify>\n...</verify>\n"
            "<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n"]
    expected = (BOS + "You are a math teacher. Your task is to review and critique the paragraphs in solution step by "
                "step.<｜User｜>" + PROBLEM + "\n" + STEPS[0] + "<｜Assistant｜>" + hist[0] + EOS + "<｜User｜>" + STEPS[1]
                + "<analyze>\nLet's analyze the Paragraph 2 step by step: ")
    assert GENPRM.render(PROBLEM, STEPS, r1tok, paragraph=1, history=hist) == expected
    # The prompt GenPRM's demo notebook printed for its first request (paragraph 1), rebuilt from its message.
    q = ("Question: Jo adds up all the positive integers from 1 to 100. Kate does a similar thing with the first 100 "
         "positive integers; however, she first rounds every integer to its nearest multiple of 10 (rounding 5s up) and "
         "then adds the 100 values. What is the positive difference between Jo's sum and Kate's sum?\n")
    para = ("First, we need to calculate Jo's sum, which is the sum of all positive integers from 1 to 100. This can be "
            "directly computed using the formula for the sum of the first \\(n\\) positive integers, which is "
            "\\(\\frac{n(n+1)}{2}\\). For \\(n = 100\\), Jo's sum is \\(\\frac{100 \\cdot 101}{2} = 5050\\).")
    printed = (BOS + "You are a math teacher. Your task is to review and critique the paragraphs in solution step by "
               "step.<｜User｜>" + q + "\n" + para + "<analyze>\nLet's analyze the Paragraph 1 step by step: ")
    assert GENPRM.render(q, [para], r1tok, paragraph=0) == printed


def test_critic_prompt_byte_for_byte(r1tok):
    tagged = "".join(f"<paragraph_{i}>\n{s}\n</paragraph_{i}>\n\n" for i, s in enumerate(STEPS)).strip()
    expected = (BOS + "<｜User｜>The following is a math problem and a solution (split into paragraphs, enclosed with tags "
                "and indexed from 0):\n\n[Math Problem]\n\n" + PROBLEM + "\n\n[Solution]\n\n" + tagged +
                "\n\nYour task is to review and critique the solution paragraph by paragraph. Once you identify an error "
                "in a paragraph, return the index of the paragraph where the earliest error occurs. Otherwise, return "
                "the index of -1 (which typically denotes \"not found\").\n\nPlease put your final answer (i.e., the "
                "index) in \\boxed{}.<｜Assistant｜><think>\n")
    assert CRITIC.render(PROBLEM, STEPS, r1tok) == expected


def test_format_defaults_are_the_papers():
    assert format_defaults("thinkprm") == dict(num_chains=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=8172,
                                               method="final")
    g = format_defaults("genprm")
    assert (g["temperature"], g["top_p"], g["top_k"], g["max_tokens"], g["max_code_rounds"]) == (0.6, 0.95, 20, 2048, 3)
    assert VerifyConfig(format="critic").method == "vote" and VerifyConfig(format="genprm", top_k=5).top_k == 5
    assert format_defaults("my-format") == {}


# -- a scripted LLM -------------------------------------------------------------------------------------------

class ScriptedLLM:
    """generate() answers from `script(prompt_text, params, index)`: a list of (text, finish, stop, logprobs) where
    logprobs maps a token position (negative from the end allowed) to {id: logprob}; other positions get -1.0 for
    every requested id. Records every call."""

    def __init__(self, tok, script):
        self.tokenizer, self.script, self.calls = tok, script, []

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            text = self.tokenizer.decode(ids)
            self.calls.append((text, p))
            comps = []
            for j, (t, finish, stop, lps) in enumerate(self.script(text, p, len(self.calls) - 1)):
                tids = self.tokenizer.encode(t, add_special_tokens=False)
                if finish == "eos":
                    tids, finish = tids + [self.tokenizer.eos_token_id], "stop"
                per = None
                if p.logprob_token_ids:
                    per = [{x: -1.0 for x in p.logprob_token_ids} for _ in tids]
                    for pos, d in (lps or {}).items():
                        per[pos].update(d)
                comps.append(CompletionOutput(index=j, text=t, token_ids=tids, token_logprobs=per, finish_reason=finish,
                                              stop_reason=stop))
            outs.append(RequestOutput(i, None, ids, comps))
        return outs


def _softmax_label(lps):  # thinkprm_api.py: scores = exp(logprobs / T); scores /= sum; score = scores[0]
    s = np.exp(np.array(lps) / 1.0)
    s /= np.sum(s)
    return float(s[0])


def test_thinkprm_forced_final_verdict_averaged_over_chains(r1tok):
    yes, no = r1tok.encode("yes", add_special_tokens=False)[0], r1tok.encode("no", add_special_tokens=False)[0]
    corr = THINKPRM.verdict_token_ids(r1tok)
    chain0 = "\nStep 1: fine. The step is \\boxed{correct}\nStep 2: 4*3 is 12. The step is \\boxed{incorrect}\n"
    chain1 = "\nStep 1: ok \\boxed{correct}\nStep 2: wrong \\boxed{incorrect}\nStep 3: follows \\boxed{incorrect}"
    finals = {0: {yes: -0.3, no: -1.6}, 1: {yes: -2.0, no: -0.2}}

    def script(text, p, call):
        if call == 0:
            assert p.n == 2 and set(p.stop) == {"Is the solution correct?", "</think>", "Step 4:"}
            return [(chain0, "stop", "Is the solution correct?", None), (chain1, "stop", "</think>", None)]
        assert text.endswith("\nIs the solution correct? ") and p.max_tokens == 1 and p.temperature == 0
        k = 0 if chain0 + "\nIs the solution correct? " in text else 1
        assert "</think>" not in text.split("Let's verify step by step:")[-1]  # the stop was cut before appending
        return [("yes" if k == 0 else "no", "length", None, {0: finals[k]})]

    llm = ScriptedLLM(r1tok, script)
    res = Verifier(llm, VerifyConfig(num_chains=2, scoring="exact")).verify([{"problem": PROBLEM, "steps": STEPS}])[0]
    assert res.error is None and len(llm.calls) == 3
    expected = [_softmax_label([finals[k][yes], finals[k][no]]) for k in (0, 1)]
    assert res.scores.final_scores == pytest.approx(expected, abs=1e-12)
    assert res.scores.score == pytest.approx(sum(expected) / 2, abs=1e-12) and res.scores.method == "final"
    # Step scores kept as an addition (the script gives both verdict tokens the same log-probability: 0.5 each):
    # chain 0 never judged step 3, chain 1 did, so every step has a score and none is below 0.5.
    assert [s.n_scored for s in res.scores.steps] == [2, 2, 1] and res.prediction == -1
    assert [s.score for s in res.scores.steps] == [0.5, 0.5, 0.5]
    assert corr[0] in llm.calls[0][1].logprob_token_ids


def test_thinkprm_budget_forcing_continues_inside_the_thinking(r1tok):
    yes = r1tok.encode("yes", add_special_tokens=False)[0]
    seen = []

    def script(text, p, call):
        seen.append(text)
        if p.max_tokens == 1:
            return [("yes", "length", None, {0: {yes: -0.1}})]
        if call == 0:
            return [("\nStep 1: short \\boxed{correct}\n", "stop", "</think>", None)]
        return [("Step 2: more \\boxed{correct}", "eos", None, None)]

    cfg = VerifyConfig(num_chains=1, max_tokens=200, budget_tokens=100, max_forcing_rounds=1, scoring="exact")
    res = Verifier(ScriptedLLM(r1tok, script), cfg).verify([{"problem": "P", "steps": ["a", "b"]}])[0]
    assert seen[1].endswith("\nStep 1: short \\boxed{correct}\n" + R.THINKPRM_TRIGGER_PHRASES[0])
    assert "</think>" not in seen[1].split("Let's verify step by step:")[-1]
    assert res.chains[0].forced_rounds == 1 and res.scores.steps[1].n_scored == 1
    assert seen[2].endswith("Step 2: more \\boxed{correct}\nIs the solution correct? ")  # EOS cut, then the question


def _released_genprm_reward(text, tokens, lps, yes_id, no_id):
    """get_reward_score of genprm_inference.py, with exact log-probabilities in place of its top-20 lists."""
    import re
    m = re.search(r"(Yes|No)\}", text, re.IGNORECASE)
    if not m:
        return 0.5
    tok = yes_id if m.group(1).capitalize() == "Yes" else no_id
    idx = len(tokens) - 1 - tokens[::-1].index(tok)
    y, n = math.exp(lps[idx][yes_id]), math.exp(lps[idx][no_id])
    return y / (y + n)


def test_genprm_protocol_transcripts(r1tok):
    yes_id = r1tok.encode("Yes", add_special_tokens=False)[-1]
    no_id = r1tok.encode("No", add_special_tokens=False)[-1]
    verdict = "The code agrees.\n</verify>\n<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n"
    vy = r1tok.encode(verdict, add_special_tokens=False).index(yes_id)
    finals, tokens = {}, {}

    def script(text, p, call):
        if text.endswith("step by step: "):  # stage 1: N analyses in one request
            assert p.n == 2 and p.stop == ["</analyze>\n"] and p.include_stop_str_in_output and p.top_k == 20
            return [(f"analysis {k}.\n</analyze>\n", "stop", "</analyze>\n", None) for k in range(2)]
        if text.endswith("```python\n"):  # the forced verify opener: write code
            assert p.stop == ["\n```\n", "</output>\n"]
            return [("print(1)\n```\n", "stop", "\n```\n", None)]
        lp = {vy: {yes_id: -0.25 - 0.5 * (call % 3), no_id: -1.5}}
        out = verdict if "Paragraph 1" in text.split("<｜User｜>")[-1] else "no verdict here</output>\n"
        toks = r1tok.encode(out, add_special_tokens=False)
        finals[call], tokens[call] = lp, toks
        return [(out, "stop", "</output>\n", lp)]

    table = {(0, 0): [SimpleNamespace(status="ok", stdout="No}\n", stderr=""),  # printed text looking like a verdict
                      SimpleNamespace(status="timeout", stdout="", stderr="")],
             (0, 1): [SimpleNamespace(status="error", stdout="1\n",
                                      stderr="Traceback...\nZeroDivisionError: division by zero\n"),
                      RuntimeError("sandbox exploded")]}
    runs = {key: 0 for key in table}

    def runner(items):  # one sandbox result per (chain key, code); an exception fails the whole call
        out = [table[key][runs[key]] for key, _ in items]
        for r in out:
            if isinstance(r, Exception):
                raise r
        for key, _ in items:
            runs[key] += 1
        return out

    llm = ScriptedLLM(r1tok, script)
    cfg = VerifyConfig(format="genprm", num_chains=2, code_runner=runner, scoring="exact")
    res = Verifier(llm, cfg).verify([{"problem": PROBLEM, "steps": STEPS[:2]}])[0]
    assert res.error is None
    c0, c1 = res.chains
    t00, t10 = c0.turns[0].text, c1.turns[0].text
    opener = "<analyze>\nLet's analyze the Paragraph 1 step by step: "
    assert t00 == (opener + "analysis 0.\n</analyze>\n" + R.GENPRM_VERIFY_TEMPLATE + "print(1)\n```\n"
                   "[Code Output]\n\n```\nNo}\n```\n" + verdict)
    assert "[Code Output]\n\n```\nCode execute Error: ZeroDivisionError: division by zero\n```\n" in t10
    # Paragraph 2: the history is judgement 0's whole turn, forced openers included.
    p2 = [t for t, _ in llm.calls if t.endswith("Paragraph 2 step by step: ")][0]
    assert "<｜Assistant｜>" + t00 + EOS + "<｜User｜>" + STEPS[1] in p2
    assert c0.turns[1].text.count("Code execute time out: Code execution timed out") == 1
    assert c1.error and "sandbox exploded" in c1.error and c1.code_runs[-1]["status"] == "exception"
    # Scores (exact): paragraph 1 reads the Yes token (the printed "No}" is masked out), paragraph 2 has no
    # decision: unscored under exact (the release's 0.5 is scoring "released"); judgement 1 failed there.
    s00 = _released_genprm_reward(verdict, c0.turns[0].token_ids, c0.turns[0].token_logprobs, yes_id, no_id)
    s10 = _released_genprm_reward(verdict, c1.turns[0].token_ids, c1.turns[0].token_logprobs, yes_id, no_id)
    assert c0.scores.steps[0].p_correct == pytest.approx(s00, abs=1e-12) and c0.scores.steps[1].p_correct is None
    assert c1.scores.steps[0].p_correct == pytest.approx(s10, abs=1e-12) and c1.scores.steps[1].p_correct is None
    assert res.scores.steps[0].score == pytest.approx((s00 + s10) / 2, abs=1e-12)  # Maj@2
    assert res.scores.steps[1].score is None and res.prediction is None  # never judged: not "no error"


def test_critic_plurality_vote_over_chains(r1tok):
    answers = ["0", "0", "0", "2", "2", "2", "-1", "-1"]

    def script(text, p, call):
        return [(f"critique ... \\boxed{{{a}}}", "eos", None, None) for a in answers]

    res = Verifier(ScriptedLLM(r1tok, script), VerifyConfig(format="critic", num_chains=8)).verify(
        [{"problem": PROBLEM, "steps": STEPS}])[0]
    assert res.scores.vote == 0 and res.prediction == 0  # the official vote; averaging 0/1 steps would say 2
    answers[:] = ["\\text{two}", "x", "x", "1"]
    res = Verifier(ScriptedLLM(r1tok, script), VerifyConfig(format="critic", num_chains=4)).verify(
        [{"problem": PROBLEM, "steps": STEPS}])[0]
    assert res.scores.vote is None and res.prediction is None  # the winner "x" is no integer


def test_user_format_from_a_base_keeps_released_strings_and_defaults(tmp_path, r1tok):
    import json

    from prmkern.verify import load_formats
    path = tmp_path / "formats.json"
    path.write_text(json.dumps({"base": "genprm", "name": "genprm-mine", "system_prompt": "Judge."}))
    (fmt,) = load_formats(path, replace=True)
    assert fmt.analyze_stop == ("</analyze>\n",) and fmt.code_stop == R.GENPRM_CODE_STOPS
    assert fmt.render("P", ["a"], r1tok, paragraph=0) == BOS + "Judge.<｜User｜>P\na" + GENPRM.prefix(0)
    assert format_defaults("genprm-mine") == format_defaults("genprm")


@pytest.mark.parametrize("scoring", ["released", "exact"])
def test_genprm_maj_n_namespaces(r1tok, scoring):
    """Released (prm_evaluate.py: one CodeExecutor per sample; genprm_inference.py: the N judgements one after
    another): one session per solution and judgement k's code after every round of judgements 0..k-1. Exact: one
    session per judgement, rounds interleaved."""
    def script(text, p, call):
        if text.endswith("step by step: "):
            return [(f"analysis {k}.\n</analyze>\n", "stop", "</analyze>\n", None) for k in range(2)]
        k = 0 if "analysis 0." in text else 1
        r = text.count("[Code Output]") + 1
        if r <= 2:
            opener = "" if r == 1 else "Again:\n```python\n"  # the forced opener starts round 1's block
            return [(f"{opener}v{k}_{r} = {r}\n```\n", "stop", "\n```\n", None)]
        return [("ok\n</verify>\n<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n", "stop", "</output>\n", None)]

    calls = []

    def runner(items):
        calls.extend(items)
        return [SimpleNamespace(status="ok", stdout="", stderr="", exception=None) for _ in items]

    cfg = VerifyConfig(format="genprm", num_chains=2, code_runner=runner, scoring=scoring)
    res = Verifier(ScriptedLLM(r1tok, script), cfg).verify([{"problem": PROBLEM, "steps": STEPS[:1]}])[0]
    assert all(len(ch.code_runs) == 2 for ch in res.chains)
    if scoring == "released":
        assert calls == [(0, "v0_1 = 1"), (0, "v0_2 = 2"), (0, "v1_1 = 1"), (0, "v1_2 = 2")]
    else:
        assert calls == [((0, 0), "v0_1 = 1"), ((0, 1), "v1_1 = 1"), ((0, 0), "v0_2 = 2"), ((0, 1), "v1_2 = 2")]
