"""`prmkern verify --ensemble FORMAT:MODEL,...`: every solution scored by each member, combined (verify/ensemble.py).

Members on one checkpoint (the same directory) share one engine and run together (verify/merged_rounds.py): each
round of every member goes into one engine call, so their chains decode in the same engine steps and prompts that
start with the same tokens share those blocks within the batch.
Different checkpoints cannot share KV (the cache holds each model's own keys and values), even fine-tunes of one
base. The verifier options given on the command line apply to every member whose format takes them (a
discriminative member, qwen-prm, takes none of the sampling options); a member repeated on the same checkpoint and
format samples with its own seed (derived from --verify-seed and its position), else it would repeat the first.

Each member's scores on a record equal `prmkern verify --format F --model M` with the same --batch-size and
--verify-seed (the same records per engine batch, the same seeds). Rows carry the ensemble's step scores and
prediction plus each member's; with labels, --summary holds each member's F1, the ensemble's and their agreement.
It does not combine anything itself (verify/ensemble.py does) or parse the shared verify options (cli/verify.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable

from prmkern.cli import options
from prmkern.cli.jobs import Item, JobRunner, write_summary
from prmkern.cli.options import UsageError
from prmkern.cli.report import progress_bar, report_failures, resume_hint, summary_line
from prmkern.sampling_params import derive_seed
from prmkern.verify.ensemble import COMBINE, Member, MemberRow, agreement, combine, parse_ensemble
from prmkern.verify.formats import get_format
from prmkern.verify.merged_rounds import verify_together
from prmkern.verify.processbench import evaluate_subsets
from prmkern.verify.protocols import Verifier, VerifyConfig

# VerifyConfig fields a discriminative member does not take (one forward pass, nothing sampled)
SAMPLING = ("num_chains", "temperature", "top_p", "top_k", "max_tokens", "budget_tokens", "stop_at_first_error")


def add_ensemble_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("ensemble (docs/ensembles.md)")
    g.add_argument("--ensemble", default=None, metavar="FORMAT:MODEL,...",
                   help="score each solution with every member (two or more FORMAT:MODEL, e.g. "
                        "thinkprm:DIR_A,genprm:DIR_B,qwen-prm:DIR_C) and combine them; members on one checkpoint "
                        "share its engine and prefix cache; the verifier options apply to every member that takes "
                        "them; --format and --model are not used")
    g.add_argument("--combine", default="mean", choices=COMBINE,
                   help="per step, over the members that scored it: mean or min of P(correct), or vote (the share "
                        "of members judging it correct by their own threshold; an error when over half call it one)")


def member_configs(given: dict[str, Any], members: list[Member],
                   name_flags: Callable[[str], str]) -> list[VerifyConfig]:
    """One VerifyConfig per member from the options the user gave (`given`: VerifyConfig field -> value); errors
    name the member and, through name_flags, the flag."""
    configs, seen = [], {}
    for m in members:
        try:
            kind = get_format(m.format).kind
        except (KeyError, ValueError) as e:
            raise UsageError(f"--ensemble member {m.name}: {str(e).strip(chr(39))}") from e
        if not os.path.isfile(os.path.join(m.model, "config.json")):  # found before any member loads
            raise UsageError(f"--ensemble member {m.name}: {m.model}: no config.json there; give a local Hugging "
                             f"Face checkpoint directory (nothing is downloaded)")
        opts = {k: v for k, v in given.items() if not (kind == "discriminative" and k in SAMPLING)}
        try:
            config = VerifyConfig(format=m.format, **opts)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--ensemble member {m.name}: {name_flags(str(e))}") from e
        key = (m.format, os.path.realpath(m.model))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1 and config.seed is not None:  # a repeated member samples anew
            config = dataclasses.replace(config, seed=derive_seed(config.seed, seen[key]))
        configs.append(config)
    return configs


def load_members(args: argparse.Namespace, members: list[Member], configs: list[VerifyConfig]) -> dict[str, Any]:
    """checkpoint realpath -> its LLM (one per checkpoint); each member's Verifier is built once here, so a member
    whose format does not fit its model fails before any record runs."""
    llms: dict[str, Any] = {}
    for m, config in zip(members, configs):
        key = os.path.realpath(m.model)
        if key not in llms:
            llms[key] = options.make_llm(argparse.Namespace(**{**vars(args), "model": m.model}))
        try:
            Verifier(llms[key], config)
        except ValueError as e:
            raise UsageError(f"--ensemble member {m.name}: {e}") from e
    return llms


def ensemble_rows(members: list[Member], configs: list[VerifyConfig], llms: dict[str, Any], batch: list[Item],
                  emit: Any, how: str, threshold: float, size: int) -> int:
    """Verifies one aligned batch with every member (cli/verify.py's verify_rows rule: group g's seed, each record at
    its place in the group) and emits the combined rows; returns the chains run."""
    group = batch[0].index // size
    start = group * size
    records: list[Any] = [None] * (max(it.index for it in batch) - start + 1)
    for it in batch:
        records[it.index - start] = it.record
    per_member: list[Any] = [None] * len(members)
    chains = 0
    by_engine: dict[str, list[int]] = {}  # members on one checkpoint run together: one engine call per round
    for j, m in enumerate(members):
        by_engine.setdefault(os.path.realpath(m.model), []).append(j)
    for key, group_members in by_engine.items():
        verifiers = []
        for j in group_members:
            config = configs[j]
            if config.seed is not None:
                config = dataclasses.replace(config, seed=derive_seed(config.seed, group))
            verifiers.append(Verifier(llms[key], config))
        for j, results in zip(group_members, verify_together(verifiers, records)):
            per_member[j] = results
    for it in batch:
        got = [res[it.index - start] for res in per_member]
        rows = [MemberRow([s.score for s in r.scores.steps] if r.scores is not None else None,
                          config.threshold, r.prediction, r.error) for r, config in zip(got, configs)]
        row = combine(rows, how, threshold)
        row["combine"] = how
        row["members"] = {m.name: {"format": m.format, "model": m.model, "prediction": mr.prediction,
                                   "step_scores": mr.step_scores, "threshold": mr.threshold, "error": mr.error,
                                   "solution_score": r.scores.score if r.scores is not None else None}
                          for m, mr, r in zip(members, rows, got)}
        chains += sum(len(r.chains) for r in got)
        emit(it.index, it.row(**row))
    return chains


def ensemble_metrics(items: list[Item], rows: list[dict], members: list[Member], subset_of: Any) -> dict | None:
    """Over labelled records: each member's ProcessBench F1, the ensemble's, and their agreement. A record a member
    failed on counts as that member's wrong answer (prediction None), as the official evaluation counts failures."""
    by_index = {it.index: it for it in items}
    names = [m.name for m in members]
    subsets: dict[str, dict[str, tuple[list, list]]] = {n: {} for n in ["ensemble"] + names}
    preds: dict[str, list] = {n: [] for n in names}
    for row in sorted(rows, key=lambda r: r["index"]):
        it = by_index.get(row["index"])
        if it is None or it.error is not None or not isinstance(it.record, dict) or "label" not in it.record:
            continue
        label, subset = it.record["label"], subset_of(it)
        member_rows = row.get("members") or {}
        for name in ["ensemble"] + names:
            p = row.get("prediction") if name == "ensemble" else (member_rows.get(name) or {}).get("prediction")
            labels, ps = subsets[name].setdefault(subset, ([], []))
            labels.append(label)
            ps.append(p)
        for name in names:
            preds[name].append((member_rows.get(name) or {}).get("prediction"))
    if not preds[names[0]]:
        return None

    def f1(name: str) -> dict:
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in evaluate_subsets(subsets[name]).items()}
    return {"solutions": len(preds[names[0]]), "ensemble": f1("ensemble"), "members": {n: f1(n) for n in names},
            "agreement": agreement(preds)}


def print_ensemble_metrics(m: dict, how: str) -> None:
    def mean(f: dict) -> str:
        return f"{f['mean_f1']:.4f}"
    print(f"ensemble ({how}) over {m['solutions']} labelled solutions: mean F1 {mean(m['ensemble'])}", file=sys.stderr)
    for name, f in m["members"].items():
        print(f"  member {name}: mean F1 {mean(f)}", file=sys.stderr)
    a = m["agreement"]
    share = "n/a" if a["all_agree"] is None else f"{a['all_agree']:.1%}"
    print(f"  all members agree on the earliest error of {share} of {a['records']} solutions", file=sys.stderr)


def cmd_verify_ensemble(args: argparse.Namespace, items: list[Item], path: str, given: dict[str, Any],
                        name_flags: Callable[[str], str], rows_of: Callable[[JobRunner, str], list[dict]]) -> int:
    """`prmkern verify --ensemble ...`: cmd_verify hands over once the records are read, with the verifier options
    the user gave, its flag-naming rule and its reader of the output's rows (cli/verify.py owns all three)."""
    try:
        members = parse_ensemble(args.ensemble)
    except ValueError as e:
        raise UsageError(str(e)) from e
    configs = member_configs(given, members, name_flags)  # before any model loads: a bad option fails at once
    threshold = args.threshold if args.threshold is not None else 0.5
    size = args.batch_size or min(max(1, 64 // c.num_chains) for c in configs)
    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=[path])
    with runner.locked():  # before the models: a second run on this output stops at once
        llms = load_members(args, members, configs)
    bar = progress_bar(args, len(items), "verify --ensemble", "solution")
    print(f"verify --ensemble: {len(items)} solutions, {len(members)} members on {len(llms)} engine(s) "
          f"({', '.join(m.name for m in members)}), combine {args.combine}", file=sys.stderr)
    chains = 0

    def process(batch: list[Item], emit: Any) -> None:
        nonlocal chains
        chains += ensemble_rows(members, configs, llms, batch, emit, args.combine, threshold, size)

    runner.run(items, process, batch_size=size, progress=bar.update if bar else None, align=True)
    if bar is not None:
        bar.close()
    if not runner.writes_summary:
        return 0
    report_failures(runner, path)
    engines = {key: {"members": [m.name for m in members if os.path.realpath(m.model) == key],
                     **llm.stats.as_dict()} for key, llm in llms.items()}
    for key, e in engines.items():
        print(f"engine {key} ({', '.join(e['members'])}): {e['prompt_tokens']} prompt tokens, {e['cached_tokens']} "
              f"from the prefix cache, {e['generated_tokens']} generated", file=sys.stderr)
    counters = [llm.stats.as_dict() for llm in llms.values()]
    total = {k: sum(c[k] for c in counters) for k in counters[0]}
    print(summary_line(total, runner.seconds, chains), file=sys.stderr)
    field = args.subset_field
    metrics = ensemble_metrics(items, rows_of(runner, args.output), members,
                               lambda it: str(it.record.get(field, "all")))
    if metrics is not None:
        print_ensemble_metrics(metrics, args.combine)
    write_summary(args.summary, runner.summary(len(items), total, chains, command="verify --ensemble", input=path,
                                               output=args.output, combine=args.combine, threshold=threshold,
                                               members=[dataclasses.asdict(m) for m in members],
                                               engines=engines, ensemble_labels=metrics))
    return 130 if runner.interrupted else 0
