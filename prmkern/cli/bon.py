"""`prmkern bon`: best-of-N, N solutions sampled per problem and one picked by verifier score or weighted vote.

Batches are aligned to --batch-size (records index // size), as in verify, so a resumed or data-parallel run
samples each problem in the same batch as one uninterrupted process. Grading against `answer` is
prmkern/verify/grading.py's; the search itself is prmkern/verify/search.py's.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from prmkern.cli import options
from prmkern.cli.jobs import Item, JobRunner, read_items, write_summary
from prmkern.cli.options import UsageError
from prmkern.cli.report import progress_bar, report_failures, resume_hint, summary_line
from prmkern.cli.verify import ChainProgress, add_verify_args, all_rows, build_config
from prmkern.sampling_params import SamplingParams
from prmkern.verify.protocols import Verifier
from prmkern.verify.search import best_of_n


def _problem_id(it: Item) -> Any:
    """'id', else 'unique_id' (the Hugging Face MATH-500 field), else the record's index in the input."""
    rec = it.record
    return rec.get("id", rec.get("unique_id", it.index))


def cmd_bon(args: argparse.Namespace) -> int:
    options.check_engine_args(args)
    if args.n < 1 or args.gen_max_tokens < 1:
        raise UsageError(f"--n {args.n} / --gen-max-tokens {args.gen_max_tokens}: accepted: ints >= 1")
    items = read_items(args.input)[:args.limit or None]
    for it in items:
        if it.error is None and not isinstance(it.record.get("problem"), str):
            it.error = f"a record needs 'problem' (str); got keys {sorted(it.record)}"
        elif it.error is None and not it.record["problem"].strip():  # best_of_n refuses it for the whole batch
            it.error = "'problem' is empty; accepted: the problem's text"
    config = build_config(args)
    options.check_search_args(args, config)
    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=[args.input])
    with runner.locked():  # before the models: a second run on this output stops at once
        llm = options.make_llm(args, default="verifier")
        generator = llm if args.generator is None else options.make_llm(
            argparse.Namespace(**{**vars(args), "model": args.generator}))
    bar = progress_bar(args, len(items), f"best-of-{args.n}", "problem")
    verifier = Verifier(ChainProgress(llm, bar), config)
    generator = ChainProgress(generator, bar)  # the sampling of candidates shows progress too
    params = SamplingParams(temperature=args.gen_temperature, top_p=0.95, max_tokens=args.gen_max_tokens,
                            seed=args.seed)

    def process(batch: list[Item], emit) -> None:
        results = best_of_n(generator, verifier, [it.record for it in batch], n=args.n, select=args.select,
                            params=params, prune=args.prune or False)
        for it, r in zip(batch, results):
            c = r.chosen
            emit(it.index, {**it.row(error=r.error), "id": _problem_id(it), "scoring": config.scoring,
                            "answer": c.answer if c else None, "score": c.score if c else None,
                            "reference": it.record.get("answer"), "correct": r.correct,
                            "chosen": r.candidates.index(c) if c in r.candidates else None,
                            "note": r.note,  # how the choice was made when not as --select asked
                            "candidates": [{"answer": x.answer, "score": x.score, "step_scores": x.step_scores,
                                            "text": x.text, "error": x.error,
                                            **({"pruned": x.pruned} if args.prune else {})}
                                           for x in r.candidates],
                            **({"pruned": r.pruned} if args.prune else {})})

    chains0 = llm.engine.metrics.verification_chains  # the Verifier counts its chains there (prmkern/metrics.py)
    runner.run(items, process, batch_size=args.batch_size or 1, progress=bar.update if bar else None, align=True)
    chains = llm.engine.metrics.verification_chains - chains0
    if bar is not None:
        bar.close()
    if not runner.writes_summary:
        return 0
    report_failures(runner, args.input)
    rows = all_rows(runner, args.output)
    graded = [r["correct"] for r in rows if r.get("correct") is not None]
    acc = sum(graded) / len(graded) if graded else None
    print(f"best-of-{args.n} ({args.select}) on {len(runner.rows)} problems in {runner.seconds:.2f} s"
          + (f", accuracy {acc:.3f} over {len(graded)} with a reference answer" if graded else ""), file=sys.stderr)
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    pruned = {"rule": args.prune, "candidates_pruned": sum(r.get("pruned", 0) for r in rows)} if args.prune else None
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="bon", input=args.input,
                                               output=args.output, accuracy=acc, graded=len(graded),
                                               scoring=config.scoring, **({"prune": pruned} if pruned else {})))
    return 130 if runner.interrupted else 0


def add_parser(sub: Any, fmt: Any) -> None:
    b = sub.add_parser("bon", help="best-of-N: sample N solutions, pick by verifier score or weighted vote",
                       formatter_class=fmt)
    b.add_argument("input", help="JSON array or JSONL of {problem[, answer, id]} (MATH-500's test.jsonl works)")
    options.add_job_args(b, "problem")
    b.add_argument("--n", type=int, default=8, help="solutions sampled per problem")
    b.add_argument("--select", default="score", choices=["score", "vote"],
                   help="score: the highest verifier score; vote: verifier-weighted majority over equal answers")
    b.add_argument("--generator", default=None, help="generator checkpoint (default: the verifier's)")
    b.add_argument("--gen-temperature", type=float, default=0.8, help="generator sampling temperature")
    b.add_argument("--gen-max-tokens", type=int, default=512, help="tokens per sampled solution")
    options.add_search_args(b)
    add_verify_args(b)
    options.add_engine_args(b)
    b.set_defaults(func=cmd_bon)
