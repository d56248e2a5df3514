"""Agreement of verification rows with gold labels: step verdicts right, earliest error exact, and ProcessBench F1
per subset (verify/processbench.py's rules), over labelled records only; failed records are left out or counted
wrong as the caller says. Printed to stderr by `print_metrics`; `verify` and `eval processbench` put the same
dictionary in --summary.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from prmkern.cli.jobs import Item
from prmkern.verify.processbench import evaluate_subsets

__all__ = ["label_metrics", "print_metrics"]


def label_metrics(items: list[Item], rows: list[dict], threshold: float, subset_of: Callable[[Item], str],
                  count_failed: bool) -> dict | None:
    """Agreement with gold labels and ProcessBench F1 per subset, over labelled records; None when none is."""
    by_index = {it.index: it for it in items}
    subsets: dict[str, tuple[list, list]] = {}
    right = total = exact = labelled = failed = 0
    for row in rows:
        it = by_index.get(row["index"])
        if it is None or it.error is not None or not isinstance(it.record, dict) or "label" not in it.record:
            continue
        label = it.record["label"]
        if row.get("error"):
            failed += 1
            if not count_failed:
                continue
        labelled += 1
        exact += row.get("prediction") == label
        labels, preds = subsets.setdefault(subset_of(it), ([], []))
        labels.append(label)
        preds.append(row.get("prediction"))
        last = len(it.record["steps"]) - 1 if label == -1 else label
        for i, s in enumerate((row.get("step_scores") or [])[:last + 1]):
            if s is not None:
                total += 1
                right += (s >= threshold) == (label == -1 or i < label)
    if not labelled:
        return None
    f1 = evaluate_subsets(subsets)
    return {"solutions": labelled, "failed": failed, "failed_counted_wrong": count_failed,
            "step_verdicts_right": right / total if total else None, "scored_steps": total,
            "earliest_error_exact": exact / labelled,
            "f1": {k: dataclasses.asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in f1.items()}}


def print_metrics(m: dict, what: str) -> None:
    share = m["step_verdicts_right"]
    print(f"against the gold labels ({what}): {'n/a' if share is None else f'{share:.1%}'} of {m['scored_steps']} "
          f"scored step verdicts right; earliest error exact on {m['earliest_error_exact']:.1%} of "
          f"{m['solutions']} solutions", file=sys.stderr)
    for name, r in m["f1"].items():
        if isinstance(r, dict):
            print(f"{name:>12}: F1 {r['f1']:.4f}  acc_err {r['acc_err']:.4f} (n={r['n_err']})  "
                  f"acc_ok {r['acc_ok']:.4f} (n={r['n_ok']})", file=sys.stderr)
    print(f"{'mean F1':>12}: {m['f1']['mean_f1']:.4f}", file=sys.stderr)
