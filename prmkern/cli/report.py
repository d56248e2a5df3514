"""What a command prints about a job: the progress bar, failed records, the throughput line, the resume hint.

Text for stderr only; the rows themselves are written by the JobRunner (jobs.py) and the summary by write_summary.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from tqdm import tqdm

from prmkern.cli.jobs import JobRunner


def resume_hint(argv: list[str] | None) -> str:
    """The command line that continues this job (printed on Ctrl-C)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in words:
        words.append("--resume")
    return "prmkern " + " ".join(shlex.quote(w) for w in words)


def progress_bar(args: argparse.Namespace, total: int, desc: str, unit: str):
    """A tqdm bar on stderr (rate and ETA per record), or None with --no-progress."""
    if args.no_progress:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def summary_line(stats: dict[str, int], seconds: float, chains: int) -> str:
    seconds = max(seconds, 1e-9)
    computed = stats["prefill_tokens"] + stats["generated_tokens"]
    return (f"{stats['requests']} requests ({stats['failed_requests']} failed), {chains} chains in {seconds:.2f} s: "
            f"{chains / seconds:.2f} chains/s, {stats['generated_tokens'] / seconds:.1f} generated tok/s, "
            f"{computed / seconds:.1f} computed tok/s\n"
            f"prompt tokens {stats['prompt_tokens']}, prefilled {stats['prefill_tokens']}, "
            f"from prefix cache {stats['cached_tokens']}, preemptions {stats['preemptions']}")


def report_failures(runner: JobRunner, path: str) -> None:
    """One stderr line per failed record (line number and reason), at most 20, then the count by reason."""
    fails = runner.failures()
    for f in fails[:20]:
        print(f"{path}:{f['line']}: record {f['index']} failed ({f['reason']}): {f['error']}", file=sys.stderr)
    if len(fails) > 20:
        print(f"... and {len(fails) - 20} more failed records (all in the output rows and --summary)",
              file=sys.stderr)
