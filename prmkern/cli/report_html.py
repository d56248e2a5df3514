"""`prmkern report RUN.jsonl [RUN2.jsonl ...] -o report.html`: the HTML report of verify runs (prmkern/report/).

Reads each run's rows (and, with --summaries, each run's --summary JSON for its K, budget and generated tokens),
takes labels from the rows or from --labels INPUT, and writes one self-contained HTML page. matplotlib (the `plot`
extra) is imported only when this command runs, so every other command works without it. Not prmkern/cli/report.py,
which formats what a job prints on stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from prmkern.cli.options import UsageError


def add_parser(sub: Any, fmt: Any) -> None:
    r = sub.add_parser("report", help="an HTML page of figures from verify runs (heatmap, calibration, F1 vs K)",
                       formatter_class=fmt)
    r.add_argument("runs", nargs="+", help="verify / eval processbench output JSONL files (one per run)")
    r.add_argument("-o", "--output", required=True, help="the HTML file to write")
    r.add_argument("--summaries", nargs="+", default=None,
                   help="each run's --summary JSON, in the runs' order (K, budget and generated tokens)")
    r.add_argument("--labels", default=None,
                   help="the input the rows were made from (its records' `label`, matched by row index), for rows "
                        "without a label")
    r.add_argument("--title", default="prmkern report")
    r.add_argument("--max-solutions", type=int, default=40, help="solutions shown per heatmap (the first ones)")
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        from prmkern.report.data import read_jsonl, read_run
        from prmkern.report.page import render
    except ImportError as e:
        raise UsageError(f"prmkern report needs matplotlib ({e}); install the plot extra: "
                         f"pip install 'prmkern[plot]'") from e
    if args.summaries is not None and len(args.summaries) != len(args.runs):
        raise UsageError(f"--summaries gives {len(args.summaries)} files for {len(args.runs)} runs; accepted: one "
                         f"per run, in the same order")
    if args.max_solutions < 1:
        raise UsageError(f"--max-solutions {args.max_solutions}: accepted: an int >= 1")
    try:
        runs = [read_run(p, args.summaries[i] if args.summaries else None) for i, p in enumerate(args.runs)]
        records = read_jsonl(args.labels) if args.labels else None
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    page = render(runs, records, title=args.title, max_solutions=args.max_solutions)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"report: {len(runs)} run(s) -> {args.output} ({len(page)} bytes)", file=sys.stderr)
    return 0
