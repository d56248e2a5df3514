"""One self-contained HTML page for one or more verify runs: a table per run, the figures as embedded PNGs.

Sections: the runs (rows, failed, K, budget, generated tokens, mean F1); per run, a heatmap of its step scores (at most
`max_solutions` solutions, the first ones by index); the calibration of the first labelled run by step position
(with each group's expected calibration error); and, with two or more runs, F1 and tokens against K / budget.
No scripts, no external files: the page opens from disk in any browser. It does not read files (data.py).
"""
from __future__ import annotations

import base64
import html
import math
from typing import Any

from prmkern.report import figures
from prmkern.report.data import Run, calibration_bins, f1_of, labels_of, sweep_axis

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}"
         "figcaption{font-size:90%;color:#555}img{max-width:100%}")


def _img(png: bytes, alt: str, caption: str, fig_id: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{fig_id}"><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _num(x: Any, fmt: str = "{:.4f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return fmt.format(x) if isinstance(x, float) else str(x)


def render(runs: list[Run], input_records: list[dict[str, Any]] | None = None, title: str = "prmkern report",
           max_solutions: int = 40) -> str:
    if not runs:
        raise ValueError("no runs given; accepted: one or more verify output files")
    labels = [labels_of(r, input_records) for r in runs]
    f1s = [f1_of(r, lab) for r, lab in zip(runs, labels)]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", "<h2>Runs</h2>",
             "<table id='runs'><tr><th>run</th><th>solutions</th><th>failed</th><th>labelled</th><th>K</th>"
             "<th>budget</th><th>generated tokens</th><th>mean F1</th></tr>"]
    for run, lab, f1 in zip(runs, labels, f1s):
        failed = sum(1 for r in run.rows if r.get("error"))
        parts.append(f"<tr><td>{html.escape(run.name)}</td><td>{len(run.rows)}</td><td>{failed}</td>"
                     f"<td>{len(lab)}</td><td>{_num(run.num_chains)}</td><td>{_num(run.budget_tokens)}</td>"
                     f"<td>{_num(run.generated_tokens)}</td><td>{_num(f1 and f1['mean_f1'])}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Step scores per solution</h2>")
    for k, (run, lab) in enumerate(zip(runs, labels)):
        shown = run.rows[:max_solutions]
        png = figures.step_heatmap([r.get("step_scores") or [] for r in shown], [lab.get(r["index"]) for r in shown],
                                   [r.get("prediction") for r in shown], [str(r.get("id", r["index"])) for r in shown],
                                   run.name)
        more = f" (the first {len(shown)} of {len(run.rows)})" if len(run.rows) > len(shown) else ""
        parts.append(_img(png, f"heatmap of step scores, {run.name}",
                          f"{run.name}: each solution's step scores{more}", f"heatmap-{k}"))

    labelled = next(((run, lab) for run, lab in zip(runs, labels) if lab), None)
    parts.append("<h2>Calibration by step position</h2>")
    if labelled is None:
        parts.append("<p>No labels: give rows with a <code>label</code> or <code>--labels INPUT</code>.</p>")
    else:
        run, lab = labelled
        bins = calibration_bins(run, lab)
        if bins:
            png = figures.calibration({n: (b["x"], b["y"], b["counts"]) for n, b in bins.items()})
            parts.append(_img(png, f"calibration plot, {run.name}",
                              f"{run.name}: labelled steps (before and at the first error) in {10} score bins",
                              "calibration"))
            parts.append("<table id='calibration'><tr><th>steps</th><th>labelled steps</th><th>ECE</th></tr>")
            for name, b in bins.items():
                parts.append(f"<tr><td>{name}</td><td>{b['steps']}</td><td>{_num(b['ece'])}</td></tr>")
            parts.append("</table>")

    if len(runs) > 1:
        xs, x_label = sweep_axis(runs)
        png = figures.sweep(xs, [f and f["mean_f1"] if f and not math.isnan(f["mean_f1"]) else None for f in f1s],
                            [r.generated_tokens for r in runs], x_label, [r.name for r in runs])
        parts.append("<h2>F1 and tokens across runs</h2>")
        parts.append(_img(png, "F1 and generated tokens across runs",
                          f"mean F1 (left) and generated tokens (right, from each run's --summary) against "
                          f"{x_label}", "sweep"))
    parts.append("</body></html>")
    return "\n".join(parts)
