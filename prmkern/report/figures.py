"""The report's figures, drawn with matplotlib (Agg: no display) and returned as PNG bytes.

* step_heatmap: one row per solution, one cell per step, coloured by the step score; the gold first error (x) and the
  predicted one (o) marked.
* calibration: for each step-position group, the labelled steps binned by their score against the share of them that
  is correct (steps after a solution's first error carry no label and are left out).
* sweep: F1 and generated tokens of several runs against the varied setting (K, the budget, or the run's order).
Inputs are plain lists; the numbers behind each figure come from prmkern/report/data.py. It does not read files or
write HTML (prmkern/report/page.py). Only this package imports matplotlib (the `plot` extra).
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
import numpy as np  # noqa: E402

DPI = 100


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def step_heatmap(scores: Sequence[Sequence[float | None]], labels: Sequence[int | None],
                 predictions: Sequence[int | None], names: Sequence[str], title: str) -> bytes:
    """scores[i][j]: solution i's step j score (None: unscored, drawn grey); labels/predictions: first error (-1:
    none, None: unknown)."""
    n = len(scores)
    width = max((len(s) for s in scores), default=1) or 1
    grid = np.full((max(n, 1), width), np.nan)  # [solutions, steps]
    for i, row in enumerate(scores):
        for j, s in enumerate(row):
            if s is not None:
                grid[i, j] = s
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * width, 14), min(1.5 + 0.28 * max(n, 1), 20)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    for i, (lab, pred) in enumerate(zip(labels, predictions)):
        if lab is not None and lab >= 0:
            ax.plot(lab, i, marker="x", color="black", markersize=9, mew=2)
        if pred is not None and pred >= 0:
            ax.plot(pred, i, marker="o", mfc="none", color="blue", markersize=11, mew=1.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks(range(width))
    ax.set_xticklabels([str(j + 1) for j in range(width)])
    ax.set_xlabel("step")
    ax.set_title(title + "  (x: gold first error, o: predicted; grey: unscored)", fontsize=9)
    fig.colorbar(im, ax=ax, label="step score P(correct)")
    return _png(fig)


def calibration(curves: dict[str, tuple[list[float], list[float], list[int]]]) -> bytes:
    """curves: group name -> (mean score per bin, share correct per bin, steps per bin), non-empty bins only."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for name, (xs, ys, counts) in curves.items():
        ax.plot(xs, ys, marker="o", label=f"{name} ({sum(counts)} steps)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step score (bin mean)")
    ax.set_ylabel("share of steps correct (gold)")
    ax.set_title("calibration against the labels, by step position", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def sweep(xs: Sequence[float], f1: Sequence[float | None], tokens: Sequence[float | None], x_label: str,
          names: Sequence[str]) -> bytes:
    """F1 (left axis) and generated tokens (right axis) of each run against the varied setting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    f1_pts = [(x, y) for x, y in zip(xs, f1) if y is not None]
    if f1_pts:
        ax.plot(*zip(*f1_pts), marker="o", color="tab:blue", label="F1")
    ax.set_xlabel(x_label)
    ax.set_ylabel("ProcessBench F1", color="tab:blue")
    ax.set_ylim(0, 1)
    tok_pts = [(x, y) for x, y in zip(xs, tokens) if y is not None]
    if tok_pts:
        ax2 = ax.twinx()
        ax2.plot(*zip(*tok_pts), marker="s", color="tab:orange", label="generated tokens")
        ax2.set_ylabel("generated tokens", color="tab:orange")
    for x, y, name in zip(xs, f1, names):
        if y is not None:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_title(f"F1 and generated tokens against {x_label}", fontsize=9)
    return _png(fig)
