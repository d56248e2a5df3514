"""What `prmkern verify`, `prmkern eval processbench` and `prmkern bon` run (their options: verify.py).

Each: read the input into Items (bad lines fail alone), check the configuration and every record, load the model,
then hand batches to a JobRunner that writes one row per record as it finishes. Metrics against labels are computed
from the rows of the whole output file, so a resumed job reports on every record, not only on the last run's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from prmkern.cli.entry import check_engine_args, make_llm, progress_bar, report_failures, resume_hint, summary_line
from prmkern.cli.verify import ChainProgress, build_config, check_verify_record, default_input, label_metrics, \
    print_metrics, verify_rows
from prmkern.cli.jobs import Item, JobRunner, json_safe, read_items, write_summary


def _all_rows(runner: JobRunner, output: str) -> list[dict[str, Any]]:
    """This run's rows, plus an earlier run's when resuming into a file."""
    if output == "-" or not runner.resume:
        return runner.rows
    with open(output) as f:
        return [json.loads(line) for line in f if line.strip()]


def _verify_job(args: argparse.Namespace, items: list[Item], desc: str,
                inputs: list[str]) -> tuple[JobRunner, Any, Any, int]:
    """Loads the model and verifies every good item; returns the runner, the llm, the verifier and the chains."""
    from prmkern.verify.protocols import Verifier
    config = build_config(args)  # before the model: a bad option fails in a second, naming the flag
    llm = make_llm(args, default="verifier")
    bar = progress_bar(args, len(items), desc, "solution")
    verifier = Verifier(ChainProgress(llm, bar), config)
    for it in items:  # every row records the scoring mode, the rows of records that failed before the engine too
        it.extra = {**it.extra, "scoring": config.scoring}
    print(f"{desc}: {len(items)} solutions with {llm.config.model} ({config.format.name}, K={config.num_chains}, "
          f"T={config.temperature}, max tokens {config.max_tokens}, budget {config.budget_tokens}, scoring "
          f"{config.scoring})", file=sys.stderr)
    chains = 0

    def process(batch: list[Item], emit) -> None:
        nonlocal chains
        chains += verify_rows(verifier, batch, emit, llm.tokenizer, args.no_chains, size)

    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=inputs)
    size = args.batch_size or max(1, 64 // config.num_chains)
    runner.run(items, process, batch_size=size, progress=bar.update if bar else None, align=True)
    if bar is not None:
        bar.close()
    return runner, llm, verifier, chains


def _verdict_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    from collections import Counter
    c: Counter = Counter()
    for r in rows:
        c.update(r.get("verdict_counts") or {})
    return dict(c)


def cmd_verify(args: argparse.Namespace) -> int:
    check_engine_args(args)
    path = default_input(args)
    items = read_items(path)[:args.limit or None]
    for it in items:
        if it.error is None:
            try:
                check_verify_record(it.record)
            except ValueError as e:
                it.error = str(e)
    build_config(args)
    runner, llm, verifier, chains = _verify_job(args, items, "verify", [path])
    report_failures(runner, path)
    stats = llm.stats.as_dict()
    print(f"{len(runner.rows)} solutions ({len(runner.failures())} failed), verdicts {_verdict_counts(runner.rows)}\n"
          + summary_line(stats, runner.seconds, chains), file=sys.stderr)
    field = args.subset_field
    metrics = label_metrics(items, _all_rows(runner, args.output), verifier.config.threshold,
                            lambda it: str(it.record.get(field, "all")), count_failed=False)
    if metrics is not None:
        print_metrics(metrics, f"labelled records, failed ones left out; subsets by '{field}'")
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="verify", input=path,
                                               output=args.output, labels=metrics,
                                               scoring=verifier.config.scoring))
    return 130 if runner.interrupted else 0


def cmd_eval_processbench(args: argparse.Namespace) -> int:
    check_engine_args(args)
    items: list[Item] = []
    subset: dict[int, str] = {}
    from prmkern.verify.processbench import balanced_limit
    for path in args.files:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in subset.values():
            raise SystemExit(f"two files give subset {name!r}; subsets are named by file name")
        file_items = read_items(path)
        for it in file_items:
            if it.error is None:
                try:
                    check_verify_record(it.record, need_label=True)
                except ValueError as e:
                    it.error = str(e)
        if args.limit:  # half erroneous, half correct: a head slice of a ProcessBench file is all erroneous
            good = [it for it in file_items if it.error is None]
            keep = {id(r) for r in balanced_limit([it.record for it in good], args.limit)}
            file_items = [it for it in good if id(it.record) in keep]
        for it in file_items:
            it.index = len(items)  # one index space over all files: the resume key
            subset[it.index] = name
            it.extra = {"subset": name, "label": it.record.get("label") if isinstance(it.record, dict) else None}
            items.append(it)
    build_config(args)
    runner, llm, verifier, chains = _verify_job(args, items, "eval processbench", list(args.files))
    report_failures(runner, "eval processbench")
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    rows = _all_rows(runner, args.output)
    official = label_metrics(items, rows, verifier.config.threshold, lambda it: subset[it.index], count_failed=True)
    completed = label_metrics(items, rows, verifier.config.threshold, lambda it: subset[it.index],
                              count_failed=False)
    fails = [r for r in rows if r.get("error")]
    if fails:
        from collections import Counter

        from prmkern.cli.jobs import failure_reason
        reasons = dict(Counter(failure_reason(r["error"]) for r in fails))
        print(f"{len(fails)} of {len(rows)} records failed ({reasons}); the official F1 below counts them as wrong "
              f"(the benchmark scores every record)", file=sys.stderr)
    if official is not None:
        print_metrics(official, "official: every record, failed ones counted wrong")
    if completed is not None and fails:
        print_metrics(completed, "completed records only")
    report = {"official": official and official["f1"], "completed_only": completed and completed["f1"],
              "failed": len(fails), "records": len(rows)}
    print(json.dumps(json_safe(report)))  # an F1 of NaN (both accuracies 0) is null: the line stays valid JSON
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="eval processbench",
                                               input=args.files, output=args.output,
                                               scoring=verifier.config.scoring, **report))
    return 130 if runner.interrupted else 0


def _problem_id(it: Item) -> Any:
    """'id', else 'unique_id' (the Hugging Face MATH-500 field), else the record's index in the input."""
    rec = it.record
    return rec.get("id", rec.get("unique_id", it.index))


def cmd_bon(args: argparse.Namespace) -> int:
    from prmkern.sampling_params import SamplingParams
    from prmkern.verify.search import best_of_n
    from prmkern.verify.protocols import Verifier
    check_engine_args(args)
    if args.n < 1 or args.gen_max_tokens < 1:
        from prmkern.cli.entry import UsageError
        raise UsageError(f"--n {args.n} / --gen-max-tokens {args.gen_max_tokens}: accepted: ints >= 1")
    items = read_items(args.input)[:args.limit or None]
    for it in items:
        if it.error is None and not isinstance(it.record.get("problem"), str):
            it.error = f"a record needs 'problem' (str); got keys {sorted(it.record)}"
    config = build_config(args)
    llm = make_llm(args, default="verifier")
    generator = llm if args.generator is None else make_llm(argparse.Namespace(**{**vars(args),
                                                                                  "model": args.generator}))
    bar = progress_bar(args, len(items), f"best-of-{args.n}", "problem")
    verifier = Verifier(ChainProgress(llm, bar), config)
    generator = ChainProgress(generator, bar)  # the sampling of candidates shows progress too
    params = SamplingParams(temperature=args.gen_temperature, top_p=0.95, max_tokens=args.gen_max_tokens,
                            seed=args.seed)

    def process(batch: list[Item], emit) -> None:
        results = best_of_n(generator, verifier, [it.record for it in batch], n=args.n, select=args.select,
                            params=params)
        for it, r in zip(batch, results):
            c = r.chosen
            emit(it.index, {**it.row(error=None), "id": _problem_id(it), "scoring": config.scoring,
                            "answer": c.answer if c else None, "score": c.score if c else None,
                            "reference": it.record.get("answer"), "correct": r.correct,
                            "chosen": r.candidates.index(c) if c in r.candidates else None,
                            "candidates": [{"answer": x.answer, "score": x.score, "step_scores": x.step_scores,
                                            "text": x.text} for x in r.candidates]})

    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=[args.input])
    chains0 = llm.engine.metrics.verification_chains  # the Verifier counts its chains there (prmkern/metrics.py)
    runner.run(items, process, batch_size=args.batch_size or 1, progress=bar.update if bar else None)
    chains = llm.engine.metrics.verification_chains - chains0
    if bar is not None:
        bar.close()
    report_failures(runner, args.input)
    rows = _all_rows(runner, args.output)
    graded = [r["correct"] for r in rows if r.get("correct") is not None]
    acc = sum(graded) / len(graded) if graded else None
    print(f"best-of-{args.n} ({args.select}) on {len(runner.rows)} problems in {runner.seconds:.2f} s"
          + (f", accuracy {acc:.3f} over {len(graded)} with a reference answer" if graded else ""), file=sys.stderr)
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="bon", input=args.input,
                                               output=args.output, accuracy=acc, graded=len(graded),
                                               scoring=config.scoring))
    return 130 if runner.interrupted else 0
