"""Ensembles of verifiers: parse a member list, combine the members' step scores, measure their agreement.

    members = parse_ensemble("thinkprm:/ckpt/ThinkPRM-1.5B,genprm:/ckpt/GenPRM-1.5B,qwen-prm:/ckpt/Qwen2.5-Math-PRM-7B")
    row = combine([member_row(...), ...], "mean", threshold=0.5)

Combination rules, per step, over the members that scored that step (a member that failed on a record, or left a
step unscored, does not count there; a step no member scored stays unscored):
* mean: the mean of the members' P(correct).
* min:  the lowest P(correct) (an error if any member is confident enough of one).
* vote: the share of the members that judge the step correct by their own threshold (score >= threshold); the
        ensemble's threshold is then 0.5, so a step is an error when more than half of the members call it one (a
        tie is not an error).
The ensemble's earliest error follows scoring.earliest_error over the combined scores (an unscored step before any
error: unknown). Agreement is over the members' earliest-error predictions (all equal, and each pair).

It does not load models or run verifiers (prmkern/cli/ensemble.py does: members on one checkpoint share one engine
and its prefix cache).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Sequence

from prmkern.verify.scoring import earliest_error

COMBINE = ("mean", "min", "vote")

__all__ = ["COMBINE", "Member", "MemberRow", "parse_ensemble", "combine", "agreement"]


@dataclass(frozen=True)
class Member:
    format: str
    model: str
    name: str  # unique within the ensemble: "format:model-dir-name" (with #k when repeated)


@dataclass
class MemberRow:
    """One member's verdict on one record (a verify row's fields)."""
    step_scores: list[float | None] | None
    threshold: float
    prediction: int | None
    error: str | None = None


def parse_ensemble(spec: str) -> list[Member]:
    """'FORMAT:MODEL,FORMAT:MODEL,...' -> members (at least two). MODEL is a checkpoint directory (split at the
    first ':', so a path may hold ':' but a format may not)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--ensemble {spec!r} is empty; accepted: FORMAT:MODEL,FORMAT:MODEL[,...]")
    members: list[Member] = []
    seen: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        fmt, sep, model = part.partition(":")
        if not sep or not fmt.strip() or not model.strip():
            raise ValueError(f"--ensemble member {part!r} is invalid; accepted: FORMAT:MODEL (e.g. "
                             f"thinkprm:/ckpt/ThinkPRM-1.5B)")
        fmt, model = fmt.strip(), model.strip()
        base = f"{fmt}:{os.path.basename(os.path.normpath(model))}"
        seen[base] = seen.get(base, 0) + 1
        members.append(Member(fmt, model, base if seen[base] == 1 else f"{base}#{seen[base]}"))
    if len(members) < 2:
        raise ValueError(f"--ensemble {spec!r} names {len(members)} member; accepted: two or more")
    return members


def combine(rows: Sequence[MemberRow], how: str, threshold: float = 0.5) -> dict[str, Any]:
    """The ensemble's row fields from its members' rows on one record: step_scores, prediction, solution_score
    (the lowest combined step score), threshold, members_scored (per step), error (all members failed)."""
    if how not in COMBINE:
        raise ValueError(f"combine={how!r} is invalid; accepted: {', '.join(COMBINE)}")
    ok = [r for r in rows if r.error is None and r.step_scores is not None]
    if not ok:
        errors = "; ".join(r.error or "no scores" for r in rows)
        return {"step_scores": None, "prediction": None, "solution_score": None, "threshold": threshold,
                "members_scored": None, "error": f"every member failed: {errors}"}
    num_steps = max(len(r.step_scores) for r in ok)  # type: ignore[arg-type]
    combined: list[float | None] = []
    counts: list[int] = []
    for i in range(num_steps):
        here = [(r.step_scores[i], r.threshold) for r in ok  # type: ignore[index]
                if i < len(r.step_scores) and r.step_scores[i] is not None]  # type: ignore[arg-type]
        counts.append(len(here))
        if not here:
            combined.append(None)
        elif how == "mean":
            combined.append(sum(s for s, _ in here) / len(here))
        elif how == "min":
            combined.append(min(s for s, _ in here))
        else:  # vote: the share of members calling the step correct by their own threshold
            combined.append(sum(1 for s, t in here if s >= t) / len(here))
    thr = 0.5 if how == "vote" else threshold
    scored = [s for s in combined if s is not None]
    return {"step_scores": combined, "prediction": earliest_error(combined, thr),
            "solution_score": min(scored) if scored else None, "threshold": thr, "members_scored": counts,
            "error": None}


def agreement(predictions: dict[str, Sequence[int | None]]) -> dict[str, Any]:
    """predictions: member name -> earliest-error prediction per record (same order; None: failed or unknown).
    all_agree: the share of records (where every member predicted) on which all members agree; pairwise: the same
    for each pair, over the records both predicted."""
    names = list(predictions)
    n = len(next(iter(predictions.values()), []))
    if any(len(p) != n for p in predictions.values()):
        raise ValueError("every member needs one prediction per record")
    full = [i for i in range(n) if all(predictions[m][i] is not None for m in names)]
    all_agree = sum(1 for i in full if len({predictions[m][i] for m in names}) == 1)
    pairwise = {}
    for a, b in itertools.combinations(names, 2):
        both = [i for i in range(n) if predictions[a][i] is not None and predictions[b][i] is not None]
        same = sum(1 for i in both if predictions[a][i] == predictions[b][i])
        pairwise[f"{a} | {b}"] = {"agree": same / len(both) if both else None, "records": len(both)}
    return {"all_agree": all_agree / len(full) if full else None, "records": len(full), "pairwise": pairwise}
