"""The verification commands of the CLI: `verify`, `eval processbench`, `bon`.

Records need `problem` and `steps`; `label` is optional everywhere except `eval processbench`. Agreement with the
labels and ProcessBench F1 are reported only over labelled records, grouped into subsets by an explicit field
(`--subset-field`, default `subset`), never by an id prefix. The verifier's configuration is built (and checked)
before the model loads; only the options the user gave are passed, the rest are the format's defaults.
One rule for unscored steps (`predict_earliest_error`): a solution whose steps were not all judged is not "no
error"; its prediction is null unless a judged step before the first unjudged one is already an error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from prmkern.cli.jobs import Item

# flag <- VerifyConfig field, for messages that name what to change
FLAGS = {"num_chains": "--chains", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "max_tokens": "--max-tokens",
         "budget_tokens": "--budget-tokens", "method": "--method", "threshold": "--threshold", "seed": "--verify-seed",
         "format": "--format", "scoring": "--scoring"}


def predict_earliest_error(step_scores: Sequence[float | None], threshold: float) -> int | None:
    """The earliest step scored below `threshold`; -1 when every step was scored and none is below; None when a
    step before any such error went unscored (not fully judged: no silent "no error"). scoring.earliest_error's
    rule, the one the Verifier's `prediction` uses; named here for the CLI's readers and train/evaluate.py."""
    from prmkern.verify.scoring import earliest_error
    return earliest_error(step_scores, threshold)


def default_format(args: argparse.Namespace) -> str:
    """--format, else the format the model was trained on: `prmkern` for the shipped verifier (also when no model is
    named, since the commands then load it), `thinkprm` for any other checkpoint. One rule for every command, so
    `prmkern serve DIR` and `prmkern serve --model DIR` verify alike."""
    if args.format:
        return args.format
    model = getattr(args, "model", None)
    if model is None:
        return "prmkern"
    from prmkern.cli.entry import shipped_verifier_dir
    shipped = shipped_verifier_dir()
    same = shipped is not None and os.path.realpath(model) == os.path.realpath(shipped)
    return "prmkern" if same else "thinkprm"


def format_default(field_name: str, fmt: str) -> Any:
    """The value a verifier option takes when the user gives none: the format's published default
    (formats.format_defaults), else VerifyConfig's generic one."""
    from prmkern.verify.protocols import VerifyConfig
    try:
        return getattr(VerifyConfig(format=fmt), field_name)
    except (KeyError, ValueError):
        return None


def add_verify_args(ap: argparse.ArgumentParser) -> None:
    from prmkern.verify.scoring import METHODS
    g = ap.add_argument_group("verifier (an option left unset, None, takes the format's published default)")

    def d(name: str) -> str:
        return f"defaults: prmkern {format_default(name, 'prmkern')}, thinkprm {format_default(name, 'thinkprm')}"
    g.add_argument("--format", default=None,
                   help="thinkprm | genprm | critic | prmkern | a name from --formats-file (None: prmkern for the "
                        "shipped verifier, which is also the default model; thinkprm for any other model)")
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
    g.add_argument("--batch-size", type=int, default=None,
                   help="records per engine batch, rows written per batch (None: verify/eval 64 // K, bon 1)")


def build_config(args: argparse.Namespace):
    """VerifyConfig from the options the user gave; errors name the flag. Runs before the model loads."""
    from prmkern.cli.entry import UsageError
    from prmkern.verify.formats import load_formats
    from prmkern.verify.protocols import VerifyConfig
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
    if budget is not None and not 0 < budget <= probe.max_tokens:
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
             "seed": args.verify_seed, "scoring": getattr(args, "scoring", None)}
    return {k: v for k, v in given.items() if v is not None}


def _name_flags(message: str) -> str:
    for field, flag in sorted(FLAGS.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(f"{field}=", f"{flag} ").replace(f"({field}", f"({flag}")
    return message


def check_verify_record(rec: dict[str, Any], need_label: bool = False) -> None:
    """ValueError naming what a record lacks; labels are optional unless need_label."""
    problem, steps = rec.get("problem"), rec.get("steps")
    if not isinstance(problem, str) or not isinstance(steps, list):
        raise ValueError(f"a record needs 'problem' (str) and 'steps' (list of str); got keys {sorted(rec)}")
    if not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError("'steps' must be a non-empty list of non-empty strings")
    if "label" not in rec:
        if need_label:
            raise ValueError("a ProcessBench record needs 'label' (the first wrong step, -1 for none)")
        return
    label = rec["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise ValueError(f"'label' is {label!r}; accepted: -1 (no error) or a step index in [0, {len(steps)}), "
                         f"or no 'label' at all")


class ChainProgress:
    """The LLM, as the Verifier sees it, with the progress bar's postfix counting finished chains inside a batch:
    a batch of solutions ends all at once, so the per-solution ticks alone would be coarse."""

    def __init__(self, llm: Any, bar: Any):
        self._llm, self._bar = llm, bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompts: list, params: Any = None, use_tqdm: bool | None = None) -> list:
        engine = getattr(self._llm, "engine", None)
        if params is not None and not isinstance(params, (list, tuple)) and isinstance(prompts, list):
            params = [params] * len(prompts)  # one SamplingParams for all prompts
        if self._bar is None or not isinstance(params, list) or not hasattr(engine, "add_request"):
            return self._llm.generate(prompts, params, use_tqdm=False)
        requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = sum(r.finished for r in requests)
        while engine.has_unfinished():
            engine.step()
            now = sum(r.finished for r in requests)
            if now != done:
                done = now
                self._bar.set_postfix_str(f"engine call: {done}/{len(requests)} requests done")
        return [engine.output(r) for r in requests]


def verify_rows(verifier: Any, batch: list[Item], emit: Callable, tokenizer: Any, no_chains: bool,
                batch_size: int) -> int:
    """Verifies a batch of records aligned to `batch_size` (all with index // batch_size == g); emits one row per
    record; returns the number of chains run.

    Sampling must not depend on what else ran (or on what a resumed run skips): group g gets its own seed, and each
    record keeps its position in the group, the finished and the bad records' places held by None (the Verifier
    fails a None record at once, without the engine)."""
    import dataclasses

    from prmkern.verify.protocols import Verifier
    group = batch[0].index // batch_size
    assert all(it.index // batch_size == group for it in batch), [it.index for it in batch]
    start = group * batch_size
    records: list[Any] = [None] * (max(it.index for it in batch) - start + 1)
    for it in batch:
        records[it.index - start] = it.record
    config = verifier.config
    if config.seed is not None:
        config = dataclasses.replace(config, seed=hash((config.seed, group)) & ((1 << 62) - 1))
    results = Verifier(verifier.llm, config).verify(records)
    chains = 0
    for it in batch:
        res = results[it.index - start]
        row = res.to_json(tokenizer, include_chains=not no_chains)
        row.pop("id", None)
        chains += len(res.chains)
        emit(it.index, it.row(**row))
    return chains


def label_metrics(items: list[Item], rows: list[dict], threshold: float, subset_of: Callable[[Item], str],
                  count_failed: bool) -> dict | None:
    """Agreement with gold labels and ProcessBench F1 per subset, over labelled records; None when none is."""
    from dataclasses import asdict

    from prmkern.verify.processbench import evaluate_subsets
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
            "f1": {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in f1.items()}}


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


def default_input(args: argparse.Namespace) -> str:
    from prmkern.cli.entry import shipped_verifier_dir
    from prmkern.verify.processbench import sample_path
    examples = shipped_verifier_dir() and os.path.join(shipped_verifier_dir(), "examples.jsonl")
    if args.input is None:  # synthetic held-out examples for the shipped verifier, else ProcessBench
        return examples if args.model is None and examples else str(sample_path())
    return str(sample_path()) if args.input == "processbench" else args.input


def add_parsers(sub: Any, fmt: Any, engine_args: Callable, job_args: Callable) -> None:
    from prmkern.cli import commands as cli_commands
    v = sub.add_parser("verify", help="score every step of solutions (labels optional)", formatter_class=fmt)
    v.add_argument("input", nargs="?", default=None,
                   help="JSON array or JSONL of {problem, steps[, id, label, subset]}; 'processbench' for the "
                        "bundled ProcessBench records (default: the shipped verifier's held-out examples)")
    job_args(v, "solution")
    v.add_argument("--no-chains", action="store_true", help="omit the chains' text from the output")
    v.add_argument("--subset-field", default="subset",
                   help="record field naming a labelled record's subset for F1 (records without it: 'all')")
    add_verify_args(v)
    engine_args(v)
    v.set_defaults(func=cli_commands.cmd_verify)

    e = sub.add_parser("eval", help="evaluations: `prmkern eval processbench FILE...`", formatter_class=fmt)
    esub = e.add_subparsers(dest="benchmark", required=True)
    pb = esub.add_parser("processbench", help="official ProcessBench F1 per subset (one file each) and their mean",
                         formatter_class=fmt)
    pb.add_argument("files", nargs="+", help="ProcessBench subset files (.json or .jsonl); subset = file name")
    job_args(pb, "record", limit_help="N records per subset, half with an error and half without, the first of "
                                       "each kind (a head slice of a ProcessBench file is all erroneous)")
    pb.add_argument("--no-chains", action="store_true", help="omit the chains' text from the output")
    add_verify_args(pb)
    engine_args(pb)
    pb.set_defaults(func=cli_commands.cmd_eval_processbench)

    b = sub.add_parser("bon", help="best-of-N: sample N solutions, pick by verifier score or weighted vote",
                       formatter_class=fmt)
    b.add_argument("input", help="JSON array or JSONL of {problem[, answer, id]} (MATH-500's test.jsonl works)")
    job_args(b, "problem")
    b.add_argument("--n", type=int, default=8, help="solutions sampled per problem")
    b.add_argument("--select", default="score", choices=["score", "vote"],
                   help="score: the highest verifier score; vote: verifier-weighted majority over equal answers")
    b.add_argument("--generator", default=None, help="generator checkpoint (default: the verifier's)")
    b.add_argument("--gen-temperature", type=float, default=0.8, help="generator sampling temperature")
    b.add_argument("--gen-max-tokens", type=int, default=512, help="tokens per sampled solution")
    add_verify_args(b)
    engine_args(b)
    b.set_defaults(func=cli_commands.cmd_bon)
