"""ProcessBench: loading records, the official plurality vote and F1, and balanced slices.

A record: ``id``, ``generator``, ``problem``, ``steps`` (list of str), ``label`` (0-based index of the earliest
wrong step, or -1 when every step is right), ``final_answer_correct``. The metric, per subset, as QwenLM/ProcessBench
code/run_eval.py computes it: a prediction matches when it equals the label (None never matches); acc_err = mean
match over erroneous records (label != -1), acc_ok = mean match over error-free ones, F1 = 2·acc_err·acc_ok /
(acc_err + acc_ok). As there (numpy means), a subset without erroneous or without error-free records has NaN
accuracy, and both accuracies 0 give NaN F1: reported as NaN, never as 0. Over subsets: the mean F1 (NaN if any is).
With several chains per record the official code takes the plurality of the chains' boxed answers (strings; ties go
to the first seen), then int() (None if that fails): `plurality_vote`.

It does not: produce predictions (the verify protocols do) or download the benchmark.
"""
from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["load_processbench", "SubsetResult", "processbench_f1", "evaluate_subsets", "sample_path", "plurality_vote",
           "balanced_limit"]

_REQUIRED = ("problem", "steps", "label")


def sample_path() -> Path:
    """The few records shipped with prmkern (prmkern/data/processbench_sample.jsonl)."""
    return Path(__file__).resolve().parents[1] / "data" / "processbench_sample.jsonl"


def load_processbench(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ProcessBench JSON array or JSONL file, checked for the fields the metric needs."""
    path = Path(path)
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}; ProcessBench records need {list(_REQUIRED)}")
        if not isinstance(r["steps"], list) or not r["steps"]:
            raise ValueError(f"{path}: record {i} has steps={r['steps']!r:.60}, expected a non-empty list of str")
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(r["steps"]):
            raise ValueError(f"{path}: record {i} has label {label!r}; expected -1 or a step index "
                             f"in [0, {len(r['steps'])})")
    return records


@dataclass(frozen=True)
class SubsetResult:
    acc_err: float  # fractions in [0, 1] (NaN: no records of that kind)
    acc_ok: float
    f1: float
    n_err: int
    n_ok: int
    f1_percent: float = math.nan  # the official printout's scale, computed as the official code does


def _check_prediction(p: Any, i: int) -> None:
    if p is None:
        return
    if isinstance(p, bool) or not isinstance(p, numbers.Integral):
        raise TypeError(f"prediction {i} is {p!r} ({type(p).__name__}); predictions must be int step indices "
                        f"(-1: no error) or None (no answer). Convert parsed strings with int() first.")


def _mean(xs: Sequence[bool]) -> float:
    return sum(xs) / len(xs) if xs else math.nan  # np.mean([]) is NaN


def _official_f1(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or a + b == 0:
        return math.nan  # numpy: 0/0 -> nan, nan propagates
    return 2 * a * b / (a + b)


def processbench_f1(labels: Sequence[int], predictions: Sequence[int | None]) -> SubsetResult:
    """The official per-subset metric. None (no parsable answer) matches nothing; an out-of-range index just does
    not match; a non-integer prediction (e.g. the string "2") is a TypeError, not a silent miss."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    for i, p in enumerate(predictions):
        _check_prediction(p, i)
    err = [p == lab for lab, p in zip(labels, predictions) if lab != -1]
    ok = [p == lab for lab, p in zip(labels, predictions) if lab == -1]
    acc_err, acc_ok = _mean(err), _mean(ok)
    f1_pct = _official_f1(acc_err * 100, acc_ok * 100)
    return SubsetResult(acc_err, acc_ok, _official_f1(acc_err, acc_ok), len(err), len(ok), f1_pct)


def evaluate_subsets(subsets: Mapping[str, tuple[Sequence[int], Sequence[int | None]]]) -> dict[str, Any]:
    """{subset: (labels, predictions)} -> {subset: SubsetResult, ..., "mean_f1": mean of the subsets' F1}."""
    if not subsets:
        raise ValueError("no subsets given")
    out: dict[str, Any] = {name: processbench_f1(*lp) for name, lp in subsets.items()}
    out["mean_f1"] = sum(r.f1 for r in out.values()) / len(subsets)
    return out


def plurality_vote(answers: Sequence[str | None]) -> int | None:
    """The official vote over chains: the most common boxed answer string (None answers dropped; ties: the first
    seen), then int(); None when no chain answered or the winner is not an integer."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    for a in votes:
        if not isinstance(a, str):
            raise TypeError(f"answers are the boxed strings the chains wrote (or None), got {a!r}")
    winner = Counter(votes).most_common(1)[0][0]
    try:
        return int(winner)
    except ValueError:
        return None


def balanced_limit(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n records, half erroneous and half error-free (as far as the file allows), the first of each kind in file
    order, returned in file order. A plain head slice of a ProcessBench file is all erroneous records."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"limit must be a positive int, got {n!r}")
    err = [i for i, r in enumerate(records) if r.get("label", -1) != -1]
    ok = [i for i, r in enumerate(records) if r.get("label", -1) == -1]
    n_ok = min(len(ok), n - min(len(err), n // 2))  # half each, the rest from whichever kind has more
    n_err = min(len(err), n - n_ok)
    keep = sorted(err[:n_err] + ok[:n_ok])
    return [records[i] for i in keep]
