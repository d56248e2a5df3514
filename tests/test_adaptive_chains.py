"""Adaptive chain count (prmkern/verify/adaptive.py): an adaptive run's chains are the first n chains of a fixed run
with the same seeds, its prediction is what those n chains give, it stops where the documented rule says (checked
against a float64 integral and a hand-worked case), continuous batching and --resume keep it, bad values fail with
messages naming what was given and what is accepted."""
from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import pytest
import torch

from prmkern.verify.adaptive import beta_binomial_pmf, flip_risk, next_total, step_flip_risk
from prmkern.verify.protocols import Verifier, VerifyConfig
from prmkern.verify.scoring import aggregate
from tests.conftest import heldout

@pytest.mark.parametrize("r,alpha,beta", [(1, 1, 1), (4, 4, 2), (14, 3, 1), (12, 5, 1), (6, 2, 5)])
def test_beta_binomial_against_a_float64_integral(r, alpha, beta):
    # The reference: P(X = x) = integral over theta of Binomial(x; r, theta) x Beta(theta; alpha, beta), by the
    # trapezoid rule in float64 on a fine grid (no factorial identities shared with the code under test).
    theta = torch.linspace(0, 1, 200001, dtype=torch.float64)
    dens = theta ** (alpha - 1) * (1 - theta) ** (beta - 1)
    dens = dens / torch.trapezoid(dens, theta)
    got = [beta_binomial_pmf(x, r, alpha, beta) for x in range(r + 1)]
    assert sum(got) == 1
    for x in range(r + 1):
        ref = torch.trapezoid(comb(r, x) * theta ** x * (1 - theta) ** (r - x) * dens, theta).item()
        assert float(got[x]) == pytest.approx(ref, abs=1e-8)


def test_rule_on_a_hand_worked_case():
    # Step with 3 "correct" votes and 1 "incorrect" of 4 chains, K = 8, t = 0.5: the 4 chains not run give X
    # "correct" votes, X ~ Beta-Binomial(4, 4, 2); the step flips to "incorrect" only if 3 + X < 4, i.e. X = 0:
    # C(4,0) B(4,6) / B(4,2) = (3! 5! / 9!) / (3! 1! / 5!) = (1/504) / (1/20) = 5/126.
    assert step_flip_risk(3, 1, 4, True, 0.5) == Fraction(5, 126)
    # Unanimous 4 of 8: 4 + X >= 4 whatever X is: no risk; with K = 16 (r = 12) the step flips if 4 + X < 8:
    # X <= 3 of 12 with theta ~ Beta(5, 1).
    assert step_flip_risk(4, 0, 4, True, 0.5) == 0
    assert step_flip_risk(4, 0, 12, True, 0.5) == sum(beta_binomial_pmf(x, 12, 5, 1) for x in range(4))
    # A two-step solution, 4 chains, K = 8: P(correct) per chain and step, means 0.75 and 0.25 -> prediction 1.
    values = [[1.0, 0.0], [1.0, 0.0], [0.9, 1.0], [0.1, 0.0]]
    means = [0.75, 0.25]
    # decisive steps 0 and 1: step 0 as above (5/126); step 1 has a = 1, b = 3, now "incorrect", flips if
    # 1 + X >= 4, X >= 3 with X ~ Beta-Binomial(4, 2, 4): the mirror image of X <= 1 of Beta-Binomial(4, 4, 2).
    step1 = beta_binomial_pmf(3, 4, 2, 4) + beta_binomial_pmf(4, 4, 2, 4)
    assert flip_risk(values, means, 1, 0.5, 8) == pytest.approx(float(Fraction(5, 126) + step1), abs=1e-15)
    # prediction 0: only step 0 is decisive (later steps cannot change an earliest error at 0 unless step 0 flips)
    assert flip_risk([[0.0, 1.0], [0.0, 0.0]], [0.0, 0.5], 0, 0.5, 2) == 0.0
    assert flip_risk(values, means, None, 0.5, 8) == 1.0  # unknown prediction: never stops early
    assert [next_total(n, 16) for n in (1, 2, 4, 8, 12)] == [2, 4, 8, 16, 16]


def _replay(full, m: int, kmax: int, risk: float, threshold: float = 0.5):
    """The documented rule applied by hand to the first chains of a fixed run: the chains it runs."""
    n = m
    while True:
        scores = [c.scores for c in full.chains[:n]]
        ag = aggregate(scores, full.num_steps, method="min", threshold=threshold)
        r = flip_risk([[v.p_correct for v in s.steps] for s in scores], [s.score for s in ag.steps],
                      ag.earliest_error, threshold, kmax)
        if n >= kmax or r <= risk:
            return n, ag.earliest_error
        n = next_total(n, kmax)


def test_adaptive_chains_are_the_first_chains_of_a_fixed_run(shipped_llm):
    recs = heldout(12)
    fixed = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=8, seed=5)).verify(recs)
    shipped_llm.reset_stats()
    adaptive = Verifier(shipped_llm, VerifyConfig(format="prmkern", chains_min=2, chains_max=8, chains_risk=0.05,
                                                  seed=5)).verify(recs)
    adaptive_tokens = shipped_llm.stats.generated_tokens
    runs = []
    for f, a in zip(fixed, adaptive):
        n = a.chains_run
        assert n == len(a.chains) and n in (2, 4, 8)
        for cf, ca in zip(f.chains, a.chains):  # chain k is the fixed run's chain k, token for token
            assert ca.turns[0].token_ids == cf.turns[0].token_ids
        want_n, want_pred = _replay(f, 2, 8, 0.05)
        assert (n, a.prediction) == (want_n, want_pred)
        # its scores are those of a fixed n-chain run over the same chains (log-probabilities of the same tokens
        # batched otherwise: equal to float rounding)
        ref = aggregate([c.scores for c in f.chains[:n]], f.num_steps, method="min", threshold=0.5)
        assert [s.score for s in a.scores.steps] == pytest.approx([s.score for s in ref.steps], abs=1e-9)
        row = a.to_json(shipped_llm.tokenizer, include_chains=False)
        assert row["chains_run"] == n and 0.0 <= row["adaptive_risk"] <= 1.0
        assert (row["adaptive_risk"] <= 0.05) or n == 8
        runs.append(n)
    assert min(runs) < 8  # some solutions stopped early ...
    assert adaptive_tokens == sum(len(c.turns[0].token_ids) for a in adaptive for c in a.chains)
    assert adaptive_tokens < sum(len(c.turns[0].token_ids) for f in fixed for c in f.chains)


def test_a_first_wave_that_agrees_stops_at_chains_min(shipped_llm):
    # chains_min 4 of chains_max 8, t = 0.5, chains_risk 0.01. First 4 chains unanimous on every decisive step:
    # a "correct" step (a = 4) cannot be outvoted by the 4 chains not run (4 + X >= 4 of 8): risk 0; the error
    # step (b = 4) flips only if all 4 others vote "correct" (X = 4 of Beta-Binomial(4, 1, 5)):
    # B(5, 5) / B(1, 5) = (4! 4! / 9!) / (1 / 5) = 1/126 < 0.01. Any disagreement on a decisive step costs at least
    # 5/126 (3 of 4 "correct": X = 0 of Beta-Binomial(4, 4, 2)), so those solutions run all 8.
    recs = heldout(16)
    fixed = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=8, seed=2)).verify(recs)
    adaptive = Verifier(shipped_llm, VerifyConfig(format="prmkern", chains_min=4, chains_max=8, chains_risk=0.01,
                                                  seed=2)).verify(recs)
    agreeing = 0
    for f, a in zip(fixed, adaptive):
        first = [c.scores for c in f.chains[:4]]
        p = aggregate(first, f.num_steps, method="min", threshold=0.5).earliest_error
        decisive = range(f.num_steps) if p == -1 else range(p + 1) if p is not None else None
        unanimous = decisive is not None and all(
            all(s.steps[j].p_correct is not None for s in first)
            and len({s.steps[j].p_correct >= 0.5 for s in first}) == 1 for j in decisive)
        if unanimous:
            agreeing += 1
            assert a.chains_run == 4 and a.prediction == p
            assert a.adaptive_risk == pytest.approx(0.0 if p == -1 else 1 / 126, abs=1e-15)
        else:
            assert a.chains_run == 8 and a.prediction == f.prediction
    assert agreeing >= 3


@pytest.mark.parametrize("kw,msg", [
    (dict(chains_min=0, chains_max=4), "chains_min=0 is invalid; accepted: an int >= 1"),
    (dict(chains_min=5, chains_max=4), "chains_max=4 is invalid with chains_min=5; accepted: an int >= 5"),
    (dict(chains_max=4), "chains_max=4 needs chains_min"),
    (dict(chains_min=2, num_chains=8, chains_max=4), "num_chains=8 and chains_max=4 disagree"),
    (dict(chains_min=2, chains_risk=1.0), "chains_risk=1.0 is invalid; accepted: a float in [0, 1)"),
    (dict(chains_min=2, chains_max=4, stop_at_first_error=True), "cannot be combined with stop_at_first_error"),
    (dict(chains_min=2, chains_max=4, budget_tokens=64), "cannot be combined with budget_tokens"),
    (dict(chains_min=2, chains_max=4, format="thinkprm", method="final"), "does not apply to method 'final'"),
    (dict(chains_min=2, chains_max=4, format="critic"), "does not apply to format 'critic'"),
    (dict(chains_min=2, chains_max=4, format="genprm"), "does not apply to format 'genprm'"),
    (dict(chains_min=2, format="thinkprm"), "num_chains=1 (the format's default) is invalid with chains_min=2"),
])
def test_bad_values_are_rejected(kw, msg):
    kw.setdefault("format", "prmkern")
    with pytest.raises(ValueError) as e:
        VerifyConfig(**kw)
    assert msg in str(e.value), str(e.value)


def test_sessions_reject_the_adaptive_count(shipped_llm):
    v = Verifier(shipped_llm, VerifyConfig(format="prmkern", chains_min=2, chains_max=4))
    with pytest.raises(ValueError, match="verification sessions run a fixed num_chains; chains_min=2"):
        v.open("Compute $1 + 1$.")


def test_cli_flags_rows_continuous_and_resume(tmp_path):
    from tests.test_cli import _main, rows_of, run_cli, write_lines
    src = write_lines(tmp_path / "in.jsonl", heldout(6))
    code, _, err = _main("verify", src, "--device", "cpu", "--chains-min", "3", "--chains-max", "2")
    assert code == 2 and "--chains-max 2 is invalid with --chains-min 3; accepted: an int >= 3" in err, err
    code, _, err = _main("verify", src, "--device", "cpu", "--chains-min", "2", "--stop-at-first-error")
    assert code == 2 and "--chains-min cannot be combined with --stop-at-first-error" in err, err
    fixed_out, out = tmp_path / "fixed.jsonl", tmp_path / "out.jsonl"
    base = ("verify", src, "--device", "cpu", "--no-progress", "--batch-size", "3")
    proc = run_cli(*base, "--chains", "4", "-o", str(fixed_out))
    assert proc.returncode == 0, proc.stderr
    summ = tmp_path / "s.json"
    proc = run_cli(*base, "--chains-min", "2", "--chains-max", "4", "-o", str(out), "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    fixed, rows = rows_of(fixed_out), rows_of(out)
    assert len(rows) == 6
    summary = json.loads(summ.read_text())["adaptive_chains"]
    assert summary["solutions"] == 6 and summary["chains_min"] == 2 and summary["chains_max"] == 4
    assert sum(summary["chains_run"].values()) == 6
    assert summary["mean_chains"] == pytest.approx(sum(r["chains_run"] for r in rows) / 6)
    for f, r in zip(fixed, rows):  # the default path is continuous batching; seeds by group as a fixed run's
        assert r["chains_run"] == len(r["chains"]) in (2, 4)
        assert [c["text"] for c in r["chains"]] == [c["text"] for c in f["chains"][:r["chains_run"]]]
    # --resume: a job cut after two rows, resumed, gives the same rows
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    proc = run_cli(*base, "--chains-min", "2", "--chains-max", "4", "-o", str(cut), "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = rows_of(cut)
    assert [(r["index"], r["chains_run"], r["prediction"], r["step_scores"]) for r in resumed] == \
        [(r["index"], r["chains_run"], r["prediction"], r["step_scores"]) for r in rows]


def test_server_body_fields_make_the_same_config():
    pytest.importorskip("pydantic")
    from prmkern.serve.protocol import BadRequest, VerifyRequest
    from prmkern.serve.verify_api import verify_config
    fixed = VerifyConfig(format="prmkern", num_chains=8)
    body = {"problem": "p", "steps": ["s"]}
    got = verify_config(fixed, VerifyRequest(**body, chains_min=2, chains_max=16, chains_risk=0.02), 32, 1024)
    assert (got.chains_min, got.chains_max, got.num_chains, got.chains_risk) == (2, 16, 16, 0.02)
    got = verify_config(fixed, VerifyRequest(**body, chains_min=2), 32, 1024)  # up to the server's K
    assert (got.chains_min, got.chains_max, got.num_chains) == (2, 8, 8)
    adaptive = VerifyConfig(format="prmkern", chains_min=2, chains_max=8)  # `prmkern serve --chains-min 2 ...`
    got = verify_config(adaptive, VerifyRequest(**body, num_chains=4), 32, 1024)
    assert (got.chains_min, got.chains_max, got.num_chains) == (2, 4, 4)
    with pytest.raises(BadRequest, match=r"chains_max=64 is invalid; accepted: an int in \[1, 32\]"):
        verify_config(fixed, VerifyRequest(**body, chains_min=2, chains_max=64), 32, 1024)
    with pytest.raises(BadRequest, match="cannot be combined with stop_at_first_error"):
        verify_config(fixed, VerifyRequest(**body, chains_min=2, stop_at_first_error=True), 32, 1024)
