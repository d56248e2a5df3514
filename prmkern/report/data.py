"""The numbers behind the HTML report: runs read from verify's JSONL rows (and --summary files), labels, F1, the
calibration bins and the sweep's axis.

A run is one `prmkern verify` / `eval processbench` output: rows with `index`, `step_scores`, `prediction` (and
`label`, `subset` where the command wrote them). Labels come from the rows, else from the input file the rows were
made from (`--labels`, matched by the row's `index`: the record's position in that file). A run's summary (the
command's --summary JSON) gives its generated tokens and, from verify's `verifier` field, its K and budget.
It does not draw (figures.py) or write HTML (page.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from prmkern.verify.processbench import evaluate_subsets

POSITION_GROUPS = ((0, 0, "step 1"), (1, 1, "step 2"), (2, 3, "steps 3-4"), (4, 10 ** 9, "steps 5+"))
BINS = 10


@dataclass
class Run:
    path: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def num_chains(self) -> int | None:
        return (self.summary.get("verifier") or {}).get("num_chains")

    @property
    def budget_tokens(self) -> int | None:
        return (self.summary.get("verifier") or {}).get("budget_tokens")

    @property
    def generated_tokens(self) -> int | None:
        return (self.summary.get("engine") or {}).get("generated_tokens")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    return out


def read_run(path: str, summary_path: str | None = None) -> Run:
    rows = read_jsonl(path)
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "index" not in r]
    if bad:
        raise ValueError(f"{path}: row {bad[0] + 1} is not a verify output row (no 'index'); accepted: the JSONL "
                         f"that `prmkern verify` / `eval processbench` writes")
    summary: dict[str, Any] = {}
    if summary_path is not None:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    return Run(path, sorted(rows, key=lambda r: r["index"]), summary)


def labels_of(run: Run, input_records: list[dict[str, Any]] | None) -> dict[int, int]:
    """row index -> gold first error (-1: none), from the rows' own `label`, else the input file's records."""
    out = {}
    for r in run.rows:
        label = r.get("label")
        if label is None and input_records is not None and 0 <= r["index"] < len(input_records):
            label = input_records[r["index"]].get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            out[r["index"]] = label
    return out


def f1_of(run: Run, labels: dict[int, int]) -> dict[str, Any] | None:
    """ProcessBench F1 per subset (the rows' `subset`, else 'all') and their mean; failed rows count as wrong."""
    subsets: dict[str, tuple[list, list]] = {}
    for r in run.rows:
        if r["index"] in labels:
            lab, pred = subsets.setdefault(str(r.get("subset", "all")), ([], []))
            lab.append(labels[r["index"]])
            pred.append(r.get("prediction"))
    return evaluate_subsets(subsets) if subsets else None


def calibration_bins(run: Run, labels: dict[int, int]) -> dict[str, dict[str, Any]]:
    """Per step-position group: the labelled steps binned by score into BINS equal bins; a step is correct when the
    solution has no error or the step comes before its first error; steps after the first error are left out."""
    groups: dict[str, list[tuple[float, bool]]] = {name: [] for _, _, name in POSITION_GROUPS}
    for r in run.rows:
        label = labels.get(r["index"])
        if label is None or r.get("error"):
            continue
        for j, s in enumerate(r.get("step_scores") or []):
            if s is None or (label != -1 and j > label):
                continue
            name = next(n for lo, hi, n in POSITION_GROUPS if lo <= j <= hi)
            groups[name].append((float(s), label == -1 or j < label))
    out = {}
    for name, pts in groups.items():
        if not pts:
            continue
        bins: list[list[tuple[float, bool]]] = [[] for _ in range(BINS)]
        for s, ok in pts:
            bins[min(int(s * BINS), BINS - 1)].append((s, ok))
        used = [b for b in bins if b]
        xs = [sum(s for s, _ in b) / len(b) for b in used]
        ys = [sum(ok for _, ok in b) / len(b) for b in used]
        counts = [len(b) for b in used]
        ece = sum(c * abs(x - y) for x, y, c in zip(xs, ys, counts)) / len(pts)  # expected calibration error
        out[name] = {"x": xs, "y": ys, "counts": counts, "steps": len(pts), "ece": ece}
    return out


def sweep_axis(runs: list[Run]) -> tuple[list[float], str]:
    """The setting the runs vary: K when their K differ, else the budget, else their order."""
    ks = [r.num_chains for r in runs]
    if None not in ks and len(set(ks)) > 1:
        return [float(k) for k in ks], "K (chains per solution)"  # type: ignore[arg-type]
    budgets = [r.budget_tokens for r in runs]
    if None not in budgets and len(set(budgets)) > 1:
        return [float(b) for b in budgets], "budget tokens"  # type: ignore[arg-type]
    return [float(i + 1) for i in range(len(runs))], "run (in the order given)"
