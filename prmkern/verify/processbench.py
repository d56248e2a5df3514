"""ProcessBench: loading records and the official F1.

A record: ``id``, ``generator``, ``problem``, ``steps`` (list of str), ``label`` (0-based index of the earliest
wrong step, or -1 when every step is right), ``final_answer_correct``. The metric, per subset: acc_err = share of
erroneous records (label != -1) whose predicted index equals the label; acc_ok = share of error-free records
predicted -1; F1 = 2·acc_err·acc_ok / (acc_err + acc_ok) (0 when both are 0); over subsets, the mean F1.

It does not: produce predictions (the verify protocols do) or download the benchmark.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["load_processbench", "SubsetResult", "processbench_f1", "evaluate_subsets", "sample_path"]

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
    acc_err: float
    acc_ok: float
    f1: float
    n_err: int
    n_ok: int


def processbench_f1(labels: Sequence[int], predictions: Sequence[int | None]) -> SubsetResult:
    """The official per-subset metric. A None prediction (no parsable answer) counts as wrong either way."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    err = [(lab, p) for lab, p in zip(labels, predictions) if lab != -1]
    ok = [(lab, p) for lab, p in zip(labels, predictions) if lab == -1]
    acc_err = sum(p == lab for lab, p in err) / len(err) if err else 0.0
    acc_ok = sum(p == -1 for _, p in ok) / len(ok) if ok else 0.0
    f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    return SubsetResult(acc_err, acc_ok, f1, len(err), len(ok))


def evaluate_subsets(subsets: Mapping[str, tuple[Sequence[int], Sequence[int | None]]]) -> dict[str, Any]:
    """{subset: (labels, predictions)} -> {subset: SubsetResult, ..., "mean_f1": mean of the subsets' F1}."""
    if not subsets:
        raise ValueError("no subsets given")
    out: dict[str, Any] = {name: processbench_f1(*lp) for name, lp in subsets.items()}
    out["mean_f1"] = sum(r.f1 for r in out.values()) / len(subsets)
    return out
