"""Search pruning on streamed verdicts: stop verifying a candidate once it provably (or by rule) cannot be chosen.

A search (best-of-N, beam search: search.py) verifies its candidates in one continuous batch through
`Verifier.stream(records, drops=...)` (streaming.py). From the "step" events this module keeps, per candidate,
bounds on the score a full run gives it (method 'min': the minimum over the scored steps of each step's mean over
the chains that scored it). With sum s over m chains that scored step j and u chains still to give their verdict
on it, the full run's mean of step j lies in [s / (m + u), (s + u) / (m + u)] (a pending chain adds a P in [0, 1]
or nothing: early_exit.RecordWatch._decide), so

* upper(c) = min_j (s_j + u_j) / (m_j + u_j) over the steps some chain could still score: c's score <= upper(c);
* lower(c) = min_j s_j / (m_j + u_j) over the steps, 0 for a step no chain scored yet while some may, the step
  skipped when no chain scored it and none is left to; None (no claim) when no step can be scored.

When a candidate's "decided" event names an error (earliest_error >= 0) it becomes prunable. Two rules:

* "exact": a prunable candidate is dropped once at least `keep` competitors in its group are known to score
  strictly above it (lower(d) > upper(c)); best-of-N keeps 1 (the chosen one), beam search keeps beam_width
  (the beam). The full run's choice can never be a dropped candidate (the chosen has the strictly highest score,
  or ties broken by order and then beats nothing strictly), so the search picks exactly what it picks unpruned.
* "error": a prunable candidate is dropped as soon as its error is decided (the issue's rule: a candidate with a
  decided error scores below the threshold, so any candidate without one beats it). The choice equals the unpruned
  one whenever the unpruned choice scores at or above the threshold; when every candidate of a problem has an
  error, search.py's documented fallback picks among them (see best_of_n).

A dropped candidate's chains are aborted at the next engine step (blocks freed), and its result is what
stop_at_first_error reports (steps judged up to the decided one, `stopped_at`); the others go on in the same batch
with the same seeds, so their results are those of a full run. Only step-verdict formats (per_step: thinkprm,
prmkern) stream step events; the rules need method 'min' and no budget forcing (check_prune).
It does not generate candidates or select them (search.py does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["PRUNE_RULES", "check_prune", "Bounds", "PrunedRun", "verify_pruned"]

PRUNE_RULES = ("exact", "error")


def check_prune(prune: Any, config: Any) -> str | None:
    """The rule named by `prune` (False/None: no pruning; True: 'exact') for a VerifyConfig; ValueError naming
    what is wrong."""
    if prune is None or prune is False:
        return None
    rule = "exact" if prune is True else prune
    if rule not in PRUNE_RULES:
        raise ValueError(f"prune={prune!r} is invalid; accepted: False, True (= 'exact'), 'exact' or 'error'")
    c, fmt = config, config.format
    if fmt.kind != "per_step":
        raise ValueError(f"prune needs a step-verdict format (per_step: thinkprm, prmkern), whose chains stream "
                         f"per-step verdicts; format {fmt.name!r} is {fmt.kind}")
    if c.method != "min":
        raise ValueError(f"prune needs the verifier's method 'min' (a decided error bounds the score below the "
                         f"threshold); got method {c.method!r}")
    if c.stop_at_first_error:
        raise ValueError("prune and stop_at_first_error do not go together: stop_at_first_error stops every "
                         "candidate once decided (its score then covers the judged steps only), prune stops only "
                         "those that cannot be chosen; use one")
    if getattr(c, "chains_min", None) is not None:
        raise ValueError(f"prune needs a fixed chain count: with chains_min={c.chains_min} (the adaptive chain "
                         f"count) chains come in waves and stream no step verdicts; use num_chains alone")
    if c.budget_tokens is not None:
        raise ValueError("prune does not apply with budget forcing (budget_tokens): a forced round reopens chains "
                         "whose verdicts the bounds took as given; use budget_tokens=None")
    return rule


class Bounds:
    """One candidate's score bounds (method 'min') from its streamed step events."""

    def __init__(self, num_steps: int, num_chains: int):
        self.k = num_chains
        # per step: (sum of the scored P, chains that scored it, chains still to give it); no event yet: all pending
        self.steps: list[tuple[float, int, int]] = [(0.0, 0, num_chains) for _ in range(num_steps)]

    def update(self, event: dict[str, Any]) -> None:
        vals = [p for p in event["p_correct"] if p is not None and p != "pending"]
        self.steps[event["step"]] = (float(sum(vals)), len(vals), event["pending"])

    def upper(self) -> float:
        """The full run's score is at most this (1.0 while nothing bounds it)."""
        highs = [(s + u) / (m + u) for s, m, u in self.steps if m + u > 0]
        return min(highs, default=1.0)

    def lower(self) -> float | None:
        """The full run's score is at least this; None: its score may still be None (no step scored)."""
        lows = []
        for s, m, u in self.steps:
            if m:
                lows.append(s / (m + u))
            elif u:
                lows.append(0.0)
        if not any(m for _, m, _ in self.steps):
            return None
        return min(lows)


@dataclass
class PrunedRun:
    """What verify_pruned gives back: a VerificationResult per record (None if it never came), which records were
    dropped, and each record's bounds when it was dropped (upper: what it could still have scored at most)."""
    results: list[Any]
    dropped: list[bool]
    upper_at_drop: list[float | None] = field(default_factory=list)
    errors_at: list[int | None] = field(default_factory=list)  # each record's decided earliest error (None: not)


def verify_pruned(verifier: Any, records: Sequence[dict[str, Any]], groups: Sequence[Any], rule: str | None,
                  keep: int = 1, competes: Sequence[bool] | None = None) -> PrunedRun:
    """Verifies `records` in one continuous batch, dropping candidates by `rule` (module docstring; None: drops
    nothing, the same streamed run for comparison).

    groups[i]: record i's group (a problem's candidates; a beam depth's proposals); keep: how many competitors must
    be known to beat a candidate before the 'exact' rule drops it; competes[i]: whether record i takes part in the
    competition at all (a beam's finished proposals do not: they neither take beam slots nor get dropped)."""
    n = len(records)
    competes = list(competes) if competes is not None else [True] * n
    k = verifier.config.num_chains
    bounds = [Bounds(len(r["steps"]), k) for r in records]
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    results: list[Any] = [None] * n
    errors_at: list[int | None] = [None] * n
    doomed: set[int] = set()  # decided with an error, not yet dropped
    drops: set[int] = set()
    upper_at: list[float | None] = [None] * n

    def drop(i: int) -> None:
        drops.add(i)
        doomed.discard(i)
        upper_at[i] = bounds[i].upper()

    def settle(group: Any) -> None:
        """The 'exact' rule over one group: drop each doomed candidate beaten by `keep` competitors."""
        mine = [i for i in members[group] if i in doomed]
        if not mine:
            return
        lows = [(j, bounds[j].lower()) for j in members[group] if competes[j]]
        for i in mine:
            top = bounds[i].upper()
            if sum(1 for j, lo in lows if j != i and lo is not None and lo > top) >= keep:
                drop(i)

    engine = getattr(getattr(verifier.llm, "_llm", verifier.llm), "engine", None)
    for ev in verifier.stream(records, max_chains=max(64, n * k), drops=drops):
        i = ev["solution"]
        if ev["type"] == "step":
            bounds[i].update(ev)
            if rule == "exact":
                settle(groups[i])
        elif ev["type"] == "decided":
            errors_at[i] = ev["earliest_error"]
            if rule is not None and ev["earliest_error"] is not None and ev["earliest_error"] >= 0 and competes[i] \
                    and results[i] is None:
                doomed.add(i)
                if rule == "error":
                    drop(i)
                else:
                    settle(groups[i])
        else:
            results[i] = ev["result"]
            doomed.discard(i)  # finished: nothing left to abort
    metrics = getattr(engine, "metrics", None)
    if metrics is not None:  # as Verifier.verify counts its verifications (prmkern:verifications, _chains)
        done = [r for r in results if r is not None and r.error is None]
        metrics.count_verifications(len(done), sum(len(r.chains) for r in done))
    return PrunedRun(results, [i in drops for i in range(n)], upper_at, errors_at)
