"""Stop at the first error: the same earliest-error predictions as a full run (same seeds), fewer generated tokens,
later steps reported as not judged; GenPRM stops after the first paragraph below the threshold; methods that need
whole chains reject the flag (Python API, CLI, server body)."""
from __future__ import annotations

import json
import re

import pytest

from prmkern import LLM
from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.verify.protocols import Verifier, VerifyConfig
from tests.conftest import SHIPPED, heldout

def bundled_sets() -> dict[str, list[dict]]:
    from prmkern.verify.processbench import sample_path
    with open(sample_path()) as f:
        return {"heldout": heldout(), "processbench": [json.loads(line) for line in f]}


@pytest.mark.parametrize("name", ["heldout", "processbench"])
def test_same_predictions_as_a_full_run_with_fewer_tokens(shipped_llm, name):
    # The shipped verifier with its own format and K=8 on a bundled set: the first wave has 5 chains (int(8 x 0.5)
    # + 1), the other 3 run only where the first five leave the answer open.
    recs = bundled_sets()[name]
    runs = {}
    for stop in (False, True):
        shipped_llm.reset_stats()
        res = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=8, seed=3,
                                                 stop_at_first_error=stop)).verify(recs)
        runs[stop] = (res, shipped_llm.stats.generated_tokens)
    (full, full_tokens), (stopped, stopped_tokens) = runs[False], runs[True]
    assert [r.prediction for r in stopped] == [r.prediction for r in full]
    assert stopped_tokens < 0.9 * full_tokens
    assert sum(len(r.chains) < 8 for r in stopped) >= len(recs) // 4  # second waves that never ran
    kinds = set()
    for f, s in zip(full, stopped):
        assert f.stopped_at is None and len(f.chains) == 8
        # by construction: stopped chain k is chain k of the full run, cut short (whatever wave it ran in)
        for cf, cs in zip(f.chains, s.chains):
            assert cf.turns[0].token_ids[:len(cs.turns[0].token_ids)] == cs.turns[0].token_ids
        if s.stopped_at is None:  # settled only as its last chain ended: a full run
            assert len(s.chains) == 8
            assert [st.score for st in s.scores.steps] == pytest.approx([st.score for st in f.scores.steps],
                                                                        abs=1e-6)
            continue
        j, thr = s.stopped_at, 0.5
        steps = [st.score for st in s.scores.steps]
        assert all(x is None for x in steps[j + 1:])
        assert all(st.counts == {"not_judged": len(s.chains)} for st in s.scores.steps[j + 1:])
        if s.prediction == -1:  # settled "no error": every step judged, none below the threshold
            kinds.add("no error")
            assert j == f.num_steps - 1 and all(x is not None and x >= thr for x in steps)
        elif s.prediction is None:
            kinds.add("unknown")
            assert steps[j] is None and all(x >= thr for x in steps[:j])
        else:
            kinds.add("error")
            assert s.prediction == j and steps[j] < thr and all(x >= thr for x in steps[:j])
        assert s.to_json(shipped_llm.tokenizer)["stopped_at"] == j
    assert "error" in kinds and (name == "processbench" or "no error" in kinds)


def test_bounds_settle_before_every_chain_has_judged():
    # RecordWatch._decide on hand-set verdicts: K=8, threshold 0.5.
    from types import SimpleNamespace
    from prmkern.verify.early_exit import RecordWatch
    v = SimpleNamespace(config=SimpleNamespace(threshold=0.5))
    rw = RecordWatch(v, 2, 8)

    def given(*per_chain):
        per_chain += ([],) * (8 - len(per_chain))
        for st, vals in zip(rw.chains, per_chain, strict=True):
            st.given, st.values = len(vals), list(vals)
        rw.decided, rw.no_error, rw.undecidable = None, False, False
        return rw._decide()
    # step 1 wrong in 5 chains, 3 still judging step 0: 0.3 max mean (3 / 8 + 5 x 0) -> decided, error at step 1
    assert given(*[[1.0, 0.0]] * 5, [], [], []) and rw.decided == 1
    # 5 chains at 0.9 on both steps, 3 unknown: the low bound 4.5 / 8 is above the threshold -> "no error"
    assert given(*[[0.9, 0.9]] * 5, [], [], []) and rw.no_error and rw.decided == 1
    # 4 chains at 1.0, 4 unknown: the low bound 4 / 8 sits at the threshold; with chains unknown a bound must
    # clear it by a margin (float sums), so it stays open
    assert not given(*[[1.0, 1.0]] * 4, [], [], [], [])
    # 4 chains at 0.99: the low bound 3.96 / 8 is below, the high bound above -> still open
    assert not given(*[[0.99, 0.99]] * 4, [], [], [], [])
    # every chain judged step 0, none scored it -> the one rule for unscored steps: unknown at step 0
    assert given(*[[None]] * 8) and rw.undecidable and rw.decided == 0
    # unscored verdicts leave the mean to the others: 7 unscored, 1 at 0.2 -> below, decided at step 0
    assert given(*[[None, None]] * 7, [0.2]) and rw.decided == 0 and not rw.undecidable
    # 1 chain judged step 0 unscored, the others not yet: open (they may score it either way)
    assert not given([None])


@pytest.mark.parametrize("fmt, method, what", [("thinkprm", "final", "method 'final'"),
                                               ("prmkern", "vote", "method 'vote'"),
                                               ("critic", None, "format 'critic'")])
def test_whole_chain_methods_reject_the_flag(fmt, method, what):
    kw = {"method": method} if method else {}
    with pytest.raises(ValueError, match=f"stop_at_first_error does not apply to {what}"):
        VerifyConfig(format=fmt, stop_at_first_error=True, **kw)
    VerifyConfig(format=fmt, **kw)  # without the flag the same config is fine


class ScriptedGenPRM:
    """A stand-in LLM for GenPRM's protocol: every analysis ends at "</analyze>\\n", every verify round ends with the
    judgement and "</output>\\n"; paragraph p is judged Yes unless p is in `wrong`. Counts the paragraphs run."""

    def __init__(self, tokenizer, wrong: set[int], yes_no: tuple[int, int]):
        self.tokenizer, self.wrong, self.yes_no = tokenizer, wrong, yes_no
        self.paragraphs: list[int] = []

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for prompt, sp in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            p = int(re.findall(r"Paragraph (\d+)", text)[-1]) - 1
            if "</analyze>\n" in (sp.stop or []):
                self.paragraphs.append(p)
                body = "the paragraph adds two numbers.</analyze>\n"
                ids, lps = self.tokenizer.encode(body, add_special_tokens=False), None
            else:
                word = "No" if p in self.wrong else "Yes"
                body = f"print(1)\n```\n</verify>\n<output>\n**Judgement**: $\\boxed{{{word}}}$\n</output>\n"
                ids = self.tokenizer.encode(body, add_special_tokens=False)
                yes, no = self.yes_no
                # P(Yes) = 0.9 for a Yes paragraph, 0.2 for a No paragraph, at every position
                lp = (-0.105, -2.303) if word == "Yes" else (-1.609, -0.223)
                lps = [{yes: lp[0], no: lp[1]} for _ in ids]
            outs.append(RequestOutput(str(len(outs)), None, list(prompt), [
                CompletionOutput(index=k, text=body, token_ids=list(ids), finish_reason="stop",
                                 stop_reason=(sp.stop or [None])[0], token_logprobs=lps) for k in range(sp.n)],
                True))
        return outs


def test_genprm_stops_after_the_first_paragraph_below_the_threshold(shipped_llm):
    rec = {"problem": "Compute 2 + 3 + 4.", "steps": ["2 + 3 = 5.", "5 + 4 = 10.", "So 10.", "The answer is 10."]}
    results = {}
    for stop in (False, True):
        v = Verifier(shipped_llm, VerifyConfig(format="genprm", num_chains=2, stop_at_first_error=stop,
                                               scoring="exact", code_runner=lambda items: [None for _ in items]))
        llm = ScriptedGenPRM(shipped_llm.tokenizer, wrong={1, 3}, yes_no=v.verdict_ids)
        v.llm = llm
        results[stop] = (v.verify([rec])[0], llm.paragraphs)
    (full, full_pars), (stopped, stopped_pars) = results[False], results[True]
    assert full_pars == [0, 1, 2, 3] and stopped_pars == [0, 1]  # paragraphs 3 and 4 are not judged
    assert full.prediction == stopped.prediction == 1
    assert stopped.stopped_at == 1 and full.stopped_at is None
    assert [s.score for s in stopped.scores.steps[:2]] == pytest.approx([0.9, 0.2], abs=1e-3)
    assert [s.score for s in stopped.scores.steps[2:]] == [None, None]


def test_cli_flag_summary_and_rejection(tmp_path):
    from tests.test_cli import _main, rows_of, run_cli, write_lines
    src = write_lines(tmp_path / "in.jsonl", [r for r in heldout() if r["label"] in (0, 1)][:3])
    code, _, err = _main("verify", src, "--device", "cpu", "--stop-at-first-error", "--method", "final",
                         "--format", "thinkprm")
    assert code == 2 and "--stop-at-first-error does not apply to method 'final'" in err, err
    out, summ = tmp_path / "out.jsonl", tmp_path / "s.json"
    proc = run_cli("verify", src, "--device", "cpu", "--chains", "2", "--no-progress", "--stop-at-first-error",
                   "-o", str(out), "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    rows = rows_of(out)
    early = json.loads(summ.read_text())["early_exit"]
    stopped = [r for r in rows if "stopped_at" in r]
    assert early["solutions"] == 3 and early["stopped"] == len(stopped) >= 1
    assert early["generated_tokens"] > 0 and early["estimated_tokens_saved"] >= 0
    for r in stopped:
        assert r["prediction"] in (r["stopped_at"], -1, None)
        assert all(s is None for s in r["step_scores"][r["stopped_at"] + 1:])
    assert "stop at the first error:" in proc.stderr


def test_server_verify_field_stops_as_the_in_process_verifier(shipped_llm):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from prmkern.serve.app import ServerConfig, build_app
    from prmkern.serve.background import serve_in_thread
    config = VerifyConfig(format="prmkern", num_chains=3, seed=0)
    stopping = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=3, seed=0, stop_at_first_error=True))
    for rec in (r for r in heldout() if r["label"] in (0, 1)):  # the first one whose judging stops at an error
        ref = stopping.verify([rec])[0]
        if ref.stopped_at is not None and ref.prediction == ref.stopped_at:
            break
    app = build_app(LLM(SHIPPED, device="cpu", dtype="float32", num_kvcache_blocks=2048),
                    ServerConfig(model_name="verifier", verify=config))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        got = c.post("/v1/verify", json={"problem": rec["problem"], "steps": rec["steps"],
                                         "stop_at_first_error": True}).json()
        bad = c.post("/v1/verify", json={"problem": rec["problem"], "steps": rec["steps"], "method": "vote",
                                         "stop_at_first_error": True})
    assert got["stopped_at"] == ref.stopped_at is not None
    assert got["prediction"] == ref.prediction == ref.stopped_at
    assert got["step_scores"] == pytest.approx([s.score for s in ref.scores.steps], abs=1e-6)
    assert bad.status_code == 400 and "does not apply to method 'vote'" in bad.text
