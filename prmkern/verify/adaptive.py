"""Adaptive chain count: sample a solution's chains in waves and stop once the chains so far settle its prediction.

`VerifyConfig(chains_min=M, chains_max=K, chains_risk=delta)` (CLI `--chains-min M --chains-max K
[--chains-risk D]`). A solution starts with M chains over its cached prompt; after each wave its chains so far are
scored (the Verifier's own scoring, the same code a fixed run uses) and the stopping rule below decides whether
another wave runs. Waves double the chains so far (M, 2M, 4M, ... capped at K): a later wave shares the prompt's
cached KV blocks, so it costs only its decode. Chain k samples with chain k's seed whatever its wave
(SamplingParams.first_chain), so an adaptive run's chains are the first n chains of a fixed K-chain run of the
same seeds, and its scores are what a fixed n-chain run gives.

The stopping rule (`flip_risk`): with n of K chains run, a step's side is where its mean P(correct) over the chains
that scored it lies against the threshold t. For step j, a chains voted P >= t and b voted P < t. Model the
K - n chains not run as exchangeable with those that ran, each voting "correct" at an unknown rate theta with a
uniform prior: theta | votes ~ Beta(a + 1, b + 1), and the number X of "correct" votes among the r = K - n chains
not run is Beta-Binomial(r, a + 1, b + 1). The step flips, in a K-chain run, when its vote share
(a + X) / (a + b + r) lands on the other side of t from the mean now. The prediction p (earliest error; -1: none)
of the K-chain run can differ from the one now only if a *decisive* step flips: steps 0..p (every step when
p = -1). The rule stops when the sum of the decisive steps' flip probabilities (a union bound on the chance that
the K-chain prediction differs) is at most `chains_risk`, or when n = K. A prediction of None (a step before any
error that no chain scored) never stops early. Vote shares stand in for the mean of P: the shipped verifier's
P(correct) are mostly near 0 or 1, and where the votes and the mean disagree the risk is high and another wave runs.

It does not run the engine itself: `run_waves` is part of a protocol coroutine (continuous.py's Round) and works
under Verifier.verify and the continuous runner alike. Not for the methods and formats that need whole chains
(final, vote, critic), GenPRM, discriminative PRMs, budget forcing or stop_at_first_error (check_adaptive).
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from math import comb
from typing import Any, Sequence

__all__ = ["check_bounds", "check_adaptive", "beta_binomial_pmf", "flip_risk", "next_total", "run_waves",
           "summary_of_rows"]


def check_bounds(m: Any, k: Any, risk: Any, k_name: str = "chains_max", note: str = "") -> None:
    """ValueError unless 1 <= chains_min <= chains_max (k None: not known yet, the format's default K comes later)
    and chains_risk in [0, 1)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"chains_min={m!r} is invalid; accepted: an int >= 1")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < m):
        raise ValueError(f"{k_name}={k!r}{note} is invalid with chains_min={m}; accepted: an int >= {m}")
    check_risk(risk)


def check_risk(risk: Any) -> None:
    """ValueError unless chains_risk is in [0, 1) (checked with or without chains_min: a bad value is refused, not
    silently unused)."""
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0.0 <= risk < 1.0:
        raise ValueError(f"chains_risk={risk!r} is invalid; accepted: a float in [0, 1)")


def check_adaptive(config: Any) -> None:
    """ValueError when chains_min / chains_max / chains_risk are bad or cannot apply (what was given, what is
    accepted). Called by VerifyConfig.__post_init__ when chains_min is set."""
    check_bounds(config.chains_min, config.chains_max, config.chains_risk)
    fmt = config.format
    if fmt.kind != "per_step":
        raise ValueError(f"chains_min does not apply to format {fmt.name!r} ({fmt.kind}): the adaptive chain count "
                         f"reads step verdicts (formats thinkprm, prmkern); run it with a fixed num_chains")
    if config.method in ("final", "vote"):
        raise ValueError(f"chains_min does not apply to method {config.method!r}: its answer comes from whole "
                         f"chains, not step verdicts; use min, last, mean or product, or a fixed num_chains")
    if config.stop_at_first_error:
        raise ValueError("chains_min cannot be combined with stop_at_first_error: the first settles the K-chain "
                         "answer exactly (every chain counted), the second stops on an estimate of it; use one")
    if config.budget_tokens is not None:
        raise ValueError("chains_min cannot be combined with budget_tokens: a forced chain's verdicts change after "
                         "a wave is judged; use a fixed num_chains with budget forcing")


def beta_binomial_pmf(x: int, r: int, alpha: int, beta: int) -> Fraction:
    """P(X = x) for X ~ Beta-Binomial(r, alpha, beta), integer alpha, beta >= 1, exactly:
    C(r, x) B(x + alpha, r - x + beta) / B(alpha, beta), with B(p, q) = (p-1)! (q-1)! / (p+q-1)!."""
    def beta_fn(p: int, q: int) -> Fraction:
        return Fraction(1, (p + q - 1) * comb(p + q - 2, p - 1))  # (p-1)!(q-1)!/(p+q-1)!
    return comb(r, x) * beta_fn(x + alpha, r - x + beta) / beta_fn(alpha, beta)


def step_flip_risk(a: int, b: int, r: int, correct_now: bool, threshold: float) -> Fraction:
    """P(the step's vote share over a + b + r chains lands on the other side of `threshold` than now), X ~
    Beta-Binomial(r, a + 1, b + 1) "correct" votes among the r chains not run."""
    if r == 0:
        return Fraction(0)
    total = a + b + r
    flip = Fraction(0)
    for x in range(r + 1):
        correct_then = (a + x) >= threshold * total  # vote share (a + x) / total >= t
        if correct_then != correct_now:
            flip += beta_binomial_pmf(x, r, a + 1, b + 1)
    return flip


def flip_risk(chain_values: Sequence[Sequence[float | None]], step_scores: Sequence[float | None],
              prediction: int | None, threshold: float, chains_max: int) -> float:
    """The stopping rule's risk for one solution (module docstring): chain_values[c][j] is chain c's P(correct) on
    step j (None: unscored), step_scores[j] the mean the Verifier computed over those chains, prediction its
    earliest error. Sum over the decisive steps of step_flip_risk; 1.0 when the prediction is None."""
    n = len(chain_values)
    assert 1 <= n <= chains_max, (n, chains_max)
    if prediction is None:
        return 1.0
    decisive = range(len(step_scores)) if prediction == -1 else range(prediction + 1)
    risk = Fraction(0)
    for j in decisive:
        votes = [row[j] for row in chain_values if j < len(row) and row[j] is not None]
        a = sum(1 for p in votes if p >= threshold)
        assert step_scores[j] is not None, (j, step_scores)
        risk += step_flip_risk(a, len(votes) - a, chains_max - n, step_scores[j] >= threshold, threshold)
    return float(risk)


def next_total(n: int, chains_max: int) -> int:
    """Chains after the next wave: double the chains so far, capped at chains_max."""
    return min(2 * n, chains_max)


def run_waves(verifier: Any, jobs: list, prompts: list, params: list, results: Any) -> Any:
    """The chains of a single-turn protocol in waves (a coroutine of continuous.Rounds): `params[n]` is job n's
    first wave (n = chains_min); after each wave the records whose risk (flip_risk) is above chains_risk get the
    next wave (first_chain = chains so far). Sets each result's chains_run and adaptive_risk."""
    from prmkern.verify.continuous import Round
    from prmkern.verify.scoring import aggregate
    c = verifier.config
    scored: dict[int, Any] = {}  # id(chain) -> its ChainScores (a chain is scored once, when its wave ends)
    active = list(range(len(jobs)))
    have = {n: 0 for n in active}
    size = {n: c.chains_min for n in active}
    while active:
        outs = yield Round([prompts[n] for n in active],
                           [dataclasses.replace(params[n], n=size[n], first_chain=have[n]) for n in active])
        verifier._take_chains([jobs[n] for n in active], [prompts[n] for n in active], outs, results)
        later = []
        for n in active:
            i, _, steps = jobs[n]
            res = results[i]
            have[n] += size[n]
            res.chains_run = len(res.chains)
            if res.error is not None:
                continue
            values = []
            for ch in res.chains:
                if id(ch) not in scored:
                    turn = ch.turns[0]
                    finished = turn.finish_reason not in ("length", "error") and ch.error is None
                    scored[id(ch)] = verifier.chain_scores(verifier.tok.decode(turn.token_ids), turn.token_ids,
                                                           turn.token_logprobs, len(steps), finished,
                                                           failed=ch.error is not None)
                values.append([v.p_correct for v in scored[id(ch)].steps])
            agg = aggregate([scored[id(ch)] for ch in res.chains], len(steps), method=c.method,
                            threshold=c.threshold)
            res.adaptive_risk = flip_risk(values, [s.score for s in agg.steps], agg.earliest_error, c.threshold,
                                          c.chains_max)
            if have[n] < c.chains_max and res.adaptive_risk > c.chains_risk:
                size[n] = next_total(have[n], c.chains_max) - have[n]
                later.append(n)
        active = later


def summary_of_rows(rows: Sequence[dict[str, Any]], config: Any) -> dict[str, Any]:
    """--summary's `adaptive_chains`: the settings, how many solutions ran how many chains, and their mean."""
    runs = [r["chains_run"] for r in rows if isinstance(r.get("chains_run"), int)]
    hist: dict[str, int] = {}
    for n in sorted(runs):
        hist[str(n)] = hist.get(str(n), 0) + 1
    return {"chains_min": config.chains_min, "chains_max": config.chains_max, "chains_risk": config.chains_risk,
            "solutions": len(runs), "chains_run": hist, "mean_chains": sum(runs) / len(runs) if runs else None}
