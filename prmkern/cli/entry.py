"""The `prmkern` command line: the parser and `main` (generate, verify, eval processbench, bon, serve, report, demo).

Every command that reads a JSONL writes one row per record as it finishes (prmkern/cli/jobs.py: flushed, a bad line
fails alone with its line number, `--resume`, `--summary FILE`, data-parallel under torchrun). Configuration is
checked before the model loads and an error names the flag to change. Progress goes to stderr; results to -o
(default stdout). The commands live beside this file (generate.py, verify.py, bon.py, serve.py); the options they
share, engine options included, in options.py.
"""
from __future__ import annotations

import argparse
import sys

from prmkern import __version__
from prmkern.cli import bon, generate, report_html, serve, verify
from prmkern.cli.jobs import check_input_paths, check_output_paths
from prmkern.cli.options import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="prmkern", formatter_class=fmt,
                                 description="Inference engine for generative process reward models")
    ap.add_argument("--version", action="version", version=f"prmkern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    generate.add_parsers(sub, fmt)
    verify.add_parsers(sub, fmt)
    bon.add_parser(sub, fmt)
    serve.add_serve_parser(sub)  # the HTTP server (docs/server.md)
    report_html.add_parser(sub, fmt)  # an HTML page of figures (prmkern/report/)
    return ap


def _check_job_paths(args: argparse.Namespace) -> None:
    """Before anything loads or is written: every input exists and is a file, and no output (-o, --summary) is
    one of the command's inputs, another output, a directory, or in a directory that does not exist."""
    if not hasattr(args, "output"):
        return
    if args.command == "verify":
        inputs = [verify.default_input(args)]
    elif args.command == "report":  # its run files, summaries and labels are all read
        inputs = [*args.runs, *(args.summaries or []), *([args.labels] if args.labels else [])]
    else:
        inputs = [p for p in [getattr(args, "input", None), *(getattr(args, "files", None) or [])] if p]
    check_input_paths(inputs)
    check_output_paths(inputs, {"-o": args.output, "--summary": getattr(args, "summary", None)})


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_job_paths(args)
        return args.func(args)
    except UsageError as e:
        ap.exit(2, f"prmkern {args.command}: error: {e.message}\n")
    return 0
