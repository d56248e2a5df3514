"""The verification commands: `verify`, `eval processbench` (and the verifier options `bon` and `serve` share).

Records need `problem` and `steps` (prmkern/verify/protocols.py's check_record, the Verifier's own rule); `label`
is optional everywhere except `eval processbench`. Agreement with the labels and ProcessBench F1 are reported only
over labelled records, grouped into subsets by an explicit field (`--subset-field`, default `subset`), never by an
id prefix. The verifier's configuration is built (and checked) once, before the model loads; only the options the
user gave are passed, the rest are the format's defaults. One rule for unscored steps (`predict_earliest_error`):
a solution whose steps were not all judged is not "no error"; its prediction is null unless a judged step before
the first unjudged one is already an error. Each command reads the input into Items (bad lines fail alone), then
hands batches to a JobRunner that writes one row per record as it finishes (data-parallel under torchrun);
metrics against labels are computed from the rows of the whole output file, so a resumed job reports on every
record, not only on the last run's.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections import Counter
from typing import Any, Sequence

from prmkern.cli import options
from prmkern.cli.ensemble import add_ensemble_args, cmd_verify_ensemble
from prmkern.cli.jobs import Item, JobRunner, failure_reason, json_safe, read_items, write_summary
from prmkern.cli.options import UsageError
from prmkern.cli.report import progress_bar, report_failures, resume_hint, summary_line
from prmkern.verify.adaptive import summary_of_rows
from prmkern.verify.formats import load_formats
from prmkern.verify.processbench import balanced_limit, sample_path
from prmkern.verify.protocols import Verifier, VerifyConfig, check_label, check_record
from prmkern.verify.scoring import METHODS, earliest_error
# re-exported: tests and benchmarks import them from here
from prmkern.cli.verify_metrics import label_metrics, print_metrics  # noqa: F401
from prmkern.cli.verify_runs import ChainProgress, verify_continuous, verify_rows  # noqa: F401

# flag <- VerifyConfig field, for messages that name what to change
FLAGS = {"num_chains": "--chains", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "max_tokens": "--max-tokens",
         "budget_tokens": "--budget-tokens", "method": "--method", "threshold": "--threshold", "seed": "--verify-seed",
         "format": "--format", "scoring": "--scoring", "stop_at_first_error": "--stop-at-first-error",
         "chains_min": "--chains-min", "chains_max": "--chains-max", "chains_risk": "--chains-risk"}


def predict_earliest_error(step_scores: Sequence[float | None], threshold: float) -> int | None:
    """The earliest step scored below `threshold`; -1 when every step was scored and none is below; None when a
    step before any such error went unscored (not fully judged: no silent "no error"). scoring.earliest_error's
    rule, the one the Verifier's `prediction` uses; named here for the CLI's readers and train/evaluate.py."""
    return earliest_error(step_scores, threshold)


def default_format(args: argparse.Namespace) -> str:
    """--format, else the format the model was trained on: `prmkern` for the shipped verifier (also when no model is
    named, since the commands then load it), `qwen-prm` for a discriminative PRM (its config.json names
    Qwen2ForProcessRewardModel), `thinkprm` for any other checkpoint. One rule for every command, so
    `prmkern serve DIR` and `prmkern serve --model DIR` verify alike."""
    if args.format:
        return args.format
    model = getattr(args, "model", None)
    if model is None:
        return "prmkern"
    try:
        import json
        with open(os.path.join(model, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError, TypeError):
        archs = []  # the model's loader reports what is wrong with the directory
    if "Qwen2ForProcessRewardModel" in archs:
        return "qwen-prm"
    shipped = options.shipped_verifier_dir()
    same = shipped is not None and os.path.realpath(model) == os.path.realpath(shipped)
    return "prmkern" if same else "thinkprm"


@functools.lru_cache(maxsize=None)
def _format_config(fmt: str) -> VerifyConfig | None:
    try:
        return VerifyConfig(format=fmt)
    except (KeyError, ValueError):
        return None


def format_default(field_name: str, fmt: str) -> Any:
    """The value a verifier option takes when the user gives none: the format's published default
    (formats.format_defaults), else VerifyConfig's generic one. One VerifyConfig per format per process (the help
    text asks for each option's default)."""
    config = _format_config(fmt)
    return None if config is None else getattr(config, field_name)


def add_verify_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("verifier (an option left unset, None, takes the format's published default)")

    def d(name: str) -> str:
        return f"defaults: prmkern {format_default(name, 'prmkern')}, thinkprm {format_default(name, 'thinkprm')}"
    g.add_argument("--format", default=None,
                   help="thinkprm | genprm | critic | prmkern | qwen-prm (a discriminative PRM) | a name from "
                        "--formats-file (None: prmkern for the shipped verifier, which is also the default model; "
                        "qwen-prm for a Qwen2ForProcessRewardModel; thinkprm for any other model)")
    g.add_argument("--formats-file", default=None, help="JSON file of user-defined verifier formats")
    g.add_argument("--chains", type=int, default=None, help=f"K: parallel chains per solution ({d('num_chains')})")
    g.add_argument("--temperature", type=float, default=None, help=f"({d('temperature')})")
    g.add_argument("--top-p", type=float, default=None, help=f"({d('top_p')})")
    g.add_argument("--top-k", dest="verify_top_k", type=int, default=None, help=f"({d('top_k')})")
    g.add_argument("--max-tokens", type=int, default=None, help=f"per chain, all rounds together ({d('max_tokens')})")
    g.add_argument("--budget-tokens", type=int, default=None,
                   help="budget forcing: a chain that ends before this many tokens is told to continue "
                        "(must be <= --max-tokens)")
    g.add_argument("--method", default=None, help=f"solution score: {' | '.join(METHODS)} ({d('method')})")
    g.add_argument("--threshold", type=float, default=None,
                   help=f"earliest error: first step scored below this ({d('threshold')})")
    g.add_argument("--verify-seed", type=int, default=None, help=f"({d('seed')})")
    g.add_argument("--scoring", default=None, choices=("released", "exact"),
                   help="released: scores as the engine each release ran on computed them (SGLang's select for "
                        "thinkprm, vLLM 0.7.1's processed log-probabilities for genprm); exact: prmkern's exact "
                        "probabilities (None: released for thinkprm, genprm and critic, exact otherwise; "
                        "docs/verifiers.md lists the differences)")
    g.add_argument("--stop-at-first-error", action="store_true",
                   help="stop judging a solution once its earliest error is decided (its remaining chains are "
                        "aborted, later steps not judged; same prediction as a full run); not for --method "
                        "final / vote or --format critic")
    g.add_argument("--chains-min", type=int, default=None,
                   help="adaptive chain count: start each solution with this many chains and add waves (doubling) "
                        "until the stopping rule holds or --chains-max; docs/adaptive_chains.md")
    g.add_argument("--chains-max", type=int, default=None,
                   help="adaptive chain count: at most this many chains per solution (None: --chains or the "
                        "format's K); needs --chains-min")
    g.add_argument("--chains-risk", type=float, default=None,
                   help="adaptive chain count: stop a solution once the estimated chance that --chains-max chains "
                        "would predict another earliest error is at most this (default 0.05)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="records per engine batch, rows written per batch (None: verify/eval 64 // K, bon 1)")


def build_config(args: argparse.Namespace):
    """VerifyConfig from the options the user gave; errors name the flag. Runs before the model loads."""
    if args.formats_file:
        try:
            load_formats(args.formats_file, replace=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"--formats-file {args.formats_file}: {e}") from e
    fmt = default_format(args)
    given = {"format": fmt, **given_options(args)}
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: accepted: an int >= 1")
    try:
        probe = VerifyConfig(**{k: v for k, v in given.items() if k != "budget_tokens"})
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(_name_flags(str(e))) from e
    budget = given.get("budget_tokens")
    if budget is not None and budget < 1:
        raise UsageError(f"--budget-tokens {budget} is invalid; accepted: an int >= 1 (the tokens a chain may use "
                         f"before it is forced to its final verdict)")
    if budget is not None and budget > probe.max_tokens:
        src = "" if args.max_tokens is not None else f" (the {fmt} default)"
        raise UsageError(f"--budget-tokens {budget} is more than --max-tokens {probe.max_tokens}{src}: a chain "
                         f"cannot be forced past its token limit; raise --max-tokens to at least {budget} "
                         f"or lower --budget-tokens")
    try:
        return VerifyConfig(**given)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(_name_flags(str(e))) from e


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The verifier options the user set (VerifyConfig field -> value), format excluded: what a server keeps when a
    request names another format (the rest come from that format's defaults)."""
    given = {"num_chains": args.chains, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": getattr(args, "verify_top_k", None), "max_tokens": args.max_tokens,
             "budget_tokens": args.budget_tokens, "method": args.method, "threshold": args.threshold,
             "seed": args.verify_seed, "scoring": getattr(args, "scoring", None),
             "stop_at_first_error": getattr(args, "stop_at_first_error", False) or None,
             "chains_min": getattr(args, "chains_min", None), "chains_max": getattr(args, "chains_max", None),
             "chains_risk": getattr(args, "chains_risk", None)}
    return {k: v for k, v in given.items() if v is not None}


def _name_flags(message: str) -> str:
    message = message.replace("stop_at_first_error does", "--stop-at-first-error does")
    message = message.replace("chains_min does", "--chains-min does").replace(
        "chains_min cannot", "--chains-min cannot").replace("with stop_at_first_error", "with --stop-at-first-error"
                                                            ).replace("with budget_tokens", "with --budget-tokens")
    for field, flag in sorted(FLAGS.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(f"SamplingParams.{field}=", f"{flag} ")  # SamplingParams' own messages
        message = message.replace(f"{field}=", f"{flag} ").replace(f"({field}", f"({flag}")
        message = re.sub(rf"\b{field}\b(?= alone| needs)|(?<=needs ){field}\b", flag, message)  # "needs chains_min"
    return message


def verify_batch_size(args: argparse.Namespace, config: VerifyConfig) -> int:
    """Records per engine batch: --batch-size, else 64 // K (about 64 chains per batch)."""
    return args.batch_size or max(1, 64 // config.num_chains)


def check_verify_record(rec: dict[str, Any], need_label: bool = False) -> None:
    """ValueError naming what a record lacks (protocols.check_record); labels are optional unless need_label."""
    check_record(rec)
    check_label(rec, need_label)


def default_input(args: argparse.Namespace) -> str:
    shipped = options.shipped_verifier_dir()
    examples = shipped and os.path.join(shipped, "examples.jsonl")
    if args.input is None:  # synthetic held-out examples for the shipped verifier, else ProcessBench
        return examples if args.model is None and examples else str(sample_path())
    return str(sample_path()) if args.input == "processbench" else args.input


# -- the commands ----------------------------------------------------------------------------------------------
def all_rows(runner: JobRunner, output: str) -> list[dict[str, Any]]:
    """This run's rows, plus an earlier run's when resuming into a file."""
    if output == "-" or not runner.resume:
        return runner.rows
    with open(output) as f:
        return [json.loads(line) for line in f if line.strip()]


def _verify_job(args: argparse.Namespace, config: VerifyConfig, items: list[Item], desc: str,
                inputs: list[str]) -> tuple[JobRunner, Any, Any, int]:
    """Loads the model and verifies every good item; returns the runner, the llm, the verifier and the chains (of
    the records that finished: an interrupted run counts the records it wrote)."""
    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=inputs)
    with runner.locked():  # before the model: a second run on this output stops at once
        llm = options.make_llm(args, default="verifier")
        bar = progress_bar(args, len(items), desc, "solution")
        verifier = Verifier(ChainProgress(llm, bar), config)
    for it in items:  # every row records the scoring mode, the rows of records that failed before the engine too
        it.extra = {**it.extra, "scoring": config.scoring}
    print(f"{desc}: {len(items)} solutions with {llm.config.model} ({config.format.name}, K={config.num_chains}, "
          f"T={config.temperature}, max tokens {config.max_tokens}, budget {config.budget_tokens}, scoring "
          f"{config.scoring})", file=sys.stderr)
    chains = 0
    early: dict[str, int] | None = {} if config.stop_at_first_error else None

    # Continuous batching across records (docs/early_exit.md); GenPRM (per-record sandbox sessions, code rounds)
    # keeps batch-synchronous groups.
    continuous = config.format.kind != "per_paragraph"
    verify_items = verify_continuous if continuous else verify_rows

    def count(n: int) -> None:  # per finished record, so Ctrl-C in the middle of a call keeps the count so far
        nonlocal chains
        chains += n

    def process(batch: list[Item], emit) -> None:
        verify_items(verifier, batch, emit, llm.tokenizer, args.no_chains, size, early, count=count)

    size = verify_batch_size(args, config)
    runner.run(items, process, batch_size=size, progress=bar.update if bar else None, align=True,
               whole=continuous)
    if bar is not None:
        bar.close()
    verifier.early_exit = early_summary(early, llm.stats.generated_tokens, runner.seconds)
    return runner, llm, verifier, chains


def early_summary(counts: dict[str, int] | None, generated: int, seconds: float) -> dict[str, Any] | None:
    """--summary's `early_exit`: what --stop-at-first-error stopped, and the tokens and seconds it saved by
    estimate (tokens per judged step of each stopped solution x its steps not judged; seconds at this run's
    generated tokens/s). docs/early_exit.md has measured figures (a full run beside a stopped one)."""
    if counts is None:
        return None
    out = {k: counts.get(k, 0) for k in ("solutions", "stopped", "steps_not_judged", "chains_aborted",
                                            "chains_not_started", "generated_tokens", "estimated_tokens_saved")}
    rate = generated / seconds if seconds > 0 else 0.0
    out["estimated_seconds_saved"] = round(out["estimated_tokens_saved"] / rate, 3) if rate else None
    return out


def _early(verifier: Any) -> dict[str, Any]:
    early = getattr(verifier, "early_exit", None)
    if early is None:
        return {}
    print(f"stop at the first error: {early['stopped']} of {early['solutions']} solutions stopped early, "
          f"{early['chains_aborted']} chains aborted, {early['chains_not_started']} not started, "
          f"{early['steps_not_judged']} steps not judged; about "
          f"{early['estimated_tokens_saved']} generated tokens saved (estimate)", file=sys.stderr)
    return {"early_exit": early}


def _adaptive(config: VerifyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """--summary's `adaptive_chains` under --chains-min (adaptive.summary_of_rows), printed too."""
    if config.chains_min is None:
        return {}
    out = summary_of_rows(rows, config)
    print(f"adaptive chains: {out['chains_run']} solutions per chain count, mean {out['mean_chains']}",
          file=sys.stderr)
    return {"adaptive_chains": out}


def _verdict_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    c: Counter = Counter()
    for r in rows:
        c.update(r.get("verdict_counts") or {})
    return dict(c)


def limit_items(items: list[Item], limit: int | None) -> list[Item]:
    """verify's --limit N. A labelled input (every well-formed record carries a `label`) gives a slice with errors:
    N records, half with an error and half without, the first of each kind, in file order (processbench's
    balanced_limit; malformed lines are left out of it). Otherwise the first N records. A head slice of a
    labelled file can hold one kind only (the bundled ProcessBench sample opens with 4 error-free records), and its
    F1 is then undefined (nan)."""
    if not limit:
        return items
    good = [it for it in items if it.error is None]
    if good and all(isinstance(it.record.get("label"), int) for it in good):
        keep = {id(r) for r in balanced_limit([it.record for it in good], limit)}
        bad = [it for it in items if it.error is not None]
        if bad:  # said, not silent: they get no row in a balanced slice
            print(f"--limit {limit}: {len(bad)} malformed record(s) left out of the balanced slice (lines "
                  f"{', '.join(str(it.line) for it in bad[:10])}{', ...' if len(bad) > 10 else ''}); without "
                  f"--limit each gets an error row", file=sys.stderr)
        return [it for it in good if id(it.record) in keep]
    return items[:limit]


def cmd_verify(args: argparse.Namespace) -> int:
    options.check_engine_args(args)
    path = default_input(args)
    items = read_items(path)
    for it in items:
        if it.error is None:
            try:
                check_verify_record(it.record)
            except ValueError as e:
                it.error = str(e)
    items = limit_items(items, args.limit)
    if args.ensemble is not None:
        if args.format or args.model:
            raise UsageError("--ensemble names each member's format and model (FORMAT:MODEL,...); drop --format "
                             "and --model")
        return cmd_verify_ensemble(args, items, path, given_options(args), _name_flags, all_rows)
    config = build_config(args)  # before the model: a bad option fails in a second, naming the flag
    runner, llm, verifier, chains = _verify_job(args, config, items, "verify", [path])
    if not runner.writes_summary:
        return 0
    report_failures(runner, path)
    stats = llm.stats.as_dict()
    print(f"{len(runner.rows)} solutions ({len(runner.failures())} failed), verdicts {_verdict_counts(runner.rows)}\n"
          + summary_line(stats, runner.seconds, chains), file=sys.stderr)
    field = args.subset_field
    metrics = label_metrics(items, all_rows(runner, args.output), verifier.config.threshold,
                            lambda it: str(it.record.get(field, "all")), count_failed=False)
    if metrics is not None:
        print_metrics(metrics, f"labelled records, failed ones left out; subsets by '{field}'")
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="verify", input=path,
                                               output=args.output, labels=metrics,
                                               scoring=verifier.config.scoring, verifier=verifier_fields(config),
                                               **_early(verifier), **_adaptive(config, all_rows(runner, args.output))))
    return 130 if runner.interrupted else 0


def verifier_fields(config: VerifyConfig) -> dict[str, Any]:
    """--summary's `verifier`: the settings a run varies (prmkern report plots F1 and tokens against them)."""
    return {"format": config.format.name, "num_chains": config.num_chains, "max_tokens": config.max_tokens,
            "budget_tokens": config.budget_tokens, "temperature": config.temperature, "method": config.method}


def cmd_eval_processbench(args: argparse.Namespace) -> int:
    options.check_engine_args(args)
    items: list[Item] = []
    subset: dict[int, str] = {}
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
    config = build_config(args)
    runner, llm, verifier, chains = _verify_job(args, config, items, "eval processbench", list(args.files))
    if not runner.writes_summary:
        return 0
    report_failures(runner, "eval processbench")
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    rows = all_rows(runner, args.output)
    official = label_metrics(items, rows, verifier.config.threshold, lambda it: subset[it.index], count_failed=True)
    completed = label_metrics(items, rows, verifier.config.threshold, lambda it: subset[it.index],
                              count_failed=False)
    fails = [r for r in rows if r.get("error")]
    if fails:
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
                                               scoring=verifier.config.scoring, verifier=verifier_fields(config),
                                               **report, **_early(verifier), **_adaptive(config, rows)))
    return 130 if runner.interrupted else 0


def add_parsers(sub: Any, fmt: Any) -> None:
    v = sub.add_parser("verify", help="score every step of solutions (labels optional)", formatter_class=fmt)
    v.add_argument("input", nargs="?", default=None,
                   help="JSON array or JSONL of {problem, steps[, id, label, subset]}; 'processbench' for the "
                        "bundled ProcessBench records (default: the shipped verifier's held-out examples)")
    options.add_job_args(v, "solution", limit_help="N solutions: the first N; of a labelled input (every record has "
                                                   "a label), N with half an error and half none, the first of each "
                                                   "kind in file order")
    v.add_argument("--no-chains", action="store_true", help="omit the chains' text from the output")
    v.add_argument("--subset-field", default="subset",
                   help="record field naming a labelled record's subset for F1 (records without it: 'all')")
    add_verify_args(v)
    add_ensemble_args(v)
    options.add_engine_args(v)
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval", help="evaluations: `prmkern eval processbench FILE...`", formatter_class=fmt)
    esub = e.add_subparsers(dest="benchmark", required=True)
    pb = esub.add_parser("processbench", help="official ProcessBench F1 per subset (one file each) and their mean",
                         formatter_class=fmt)
    pb.add_argument("files", nargs="+", help="ProcessBench subset files (.json or .jsonl); subset = file name")
    options.add_job_args(pb, "record", limit_help="N records per subset, half with an error and half without, the first of "
                                       "each kind (a head slice of a ProcessBench file is all erroneous)")
    pb.add_argument("--no-chains", action="store_true", help="omit the chains' text from the output")
    add_verify_args(pb)
    options.add_engine_args(pb)
    pb.set_defaults(func=cmd_eval_processbench)
