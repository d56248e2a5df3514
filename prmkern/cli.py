"""The `prmkern` command line: generate, verify, bon, eval processbench, demo.

Progress goes to stderr with a bar; results to stdout or --output; a throughput summary closes every run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from prmkern.sampling import SamplingParams

SAMPLING_KEYS = ("n", "temperature", "top_k", "top_p", "min_tokens", "max_tokens", "ignore_eos", "stop",
                 "stop_token_ids", "include_stop_str_in_output", "seed", "logprobs", "logprob_token_ids",
                 "skip_special_tokens")


def _engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: the embedded model)")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kvcache-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--attention-backend", default=None, help="torch | triton (default: triton on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="split the model over this many GPUs (or CPU processes): docs/distributed.md")


def shipped_verifier_dir() -> str | None:
    """The small generative verifier trained on the synthetic task (train/make_default_verifier.sh), if shipped."""
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "verifier")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def _make_llm(args: argparse.Namespace, default: str = "random"):
    """default: 'verifier' (the shipped verifier, else the random model) or 'random' (the random-weight model)."""
    from prmkern.llm import LLM
    from prmkern.tiny import default_model_dir
    model = args.model or (default == "verifier" and shipped_verifier_dir()) or default_model_dir()
    return LLM(model, dtype=args.dtype, device=args.device, block_size=args.block_size,
               num_kvcache_blocks=args.num_kvcache_blocks, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
               seed=args.seed, tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))


def summary(stats: dict[str, int], seconds: float, chains: int) -> str:
    computed = stats["prefill_tokens"] + stats["generated_tokens"]
    saved = stats["cached_tokens"]
    return (f"{stats['requests']} requests ({stats['failed_requests']} failed), {chains} chains in {seconds:.2f} s: "
            f"{chains / seconds:.2f} chains/s, {stats['generated_tokens'] / seconds:.1f} generated tok/s, "
            f"{computed / seconds:.1f} computed tok/s\n"
            f"prompt tokens {stats['prompt_tokens']}, prefilled {stats['prefill_tokens']}, "
            f"from prefix cache {saved}, preemptions {stats['preemptions']}")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    stream = sys.stdin if path == "-" else open(path)
    records = []
    for i, line in enumerate(stream, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not a JSON object ({e})")
    return records


def cmd_generate(args: argparse.Namespace) -> int:
    records = _read_jsonl(args.input)
    defaults = {k: getattr(args, k) for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")
                if getattr(args, k) is not None}
    prompts, params, errors = [], [], {}
    for i, rec in enumerate(records):
        prompt = rec.get("prompt", rec.get("prompt_token_ids"))
        try:
            if prompt is None:
                raise ValueError("a record needs 'prompt' (text) or 'prompt_token_ids' (list of ints)")
            unknown = set(rec) - set(SAMPLING_KEYS) - {"prompt", "prompt_token_ids", "id"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; accepted: prompt, prompt_token_ids, id, "
                                 f"{', '.join(SAMPLING_KEYS)}")
            params.append(SamplingParams(**{**defaults, **{k: rec[k] for k in SAMPLING_KEYS if k in rec}}))
            prompts.append(prompt)
        except (TypeError, ValueError) as e:
            errors[i] = str(e)
    llm = _make_llm(args)
    start = time.perf_counter()
    outputs = iter(llm.generate(prompts, params, use_tqdm=not args.no_progress) if prompts else [])
    seconds = time.perf_counter() - start
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    chains = 0
    for i, rec in enumerate(records):
        row: dict[str, Any] = {"id": rec.get("id", i)}
        if i in errors:
            row["error"] = errors[i]
        else:
            r = next(outputs)
            row["error"] = r.error
            row["outputs"] = [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                               **({"logprobs": c.logprobs} if c.logprobs is not None else {}),
                               **({"token_logprobs": c.token_logprobs} if c.token_logprobs is not None else {})}
                              for c in r.outputs]
            chains += len(r.outputs)
        out.write(json.dumps(row) + "\n")
    if out is not sys.stdout:
        out.close()
    stats = llm.stats.as_dict()
    stats["failed_requests"] += len(errors)
    stats["requests"] += len(errors)
    print(summary(stats, seconds, chains), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Many chains over one prompt on the embedded default: the prompt is prefilled once and shared."""
    from prmkern.tiny import DEFAULT_MODEL
    llm = _make_llm(args)
    print(f"model: {llm.config.model} ({DEFAULT_MODEL['arch'] if args.model is None else 'user checkpoint'}, "
          f"random weights)" if args.model is None else f"model: {args.model}", file=sys.stderr)
    words = "Problem: a train travels 120 km in 1.5 hours. Step 1: speed = 120 / 1.5 = 80 km/h. Verify each step."
    prompt_ids = (llm.tokenizer.encode(words, add_special_tokens=False) * 64)[:args.prompt_len]
    params = SamplingParams(n=args.chains, temperature=1.0, max_tokens=args.gen_len, ignore_eos=True, seed=0)
    start = time.perf_counter()
    out = llm.generate([prompt_ids], params, use_tqdm=not args.no_progress)[0]
    seconds = time.perf_counter() - start
    print(f"{len(out.outputs)} chains of {args.gen_len} tokens over one {len(prompt_ids)}-token prompt; chain 0 "
          f"starts: {out.outputs[0].text[:60]!r}")
    print(summary(llm.stats.as_dict(), seconds, len(out.outputs)))
    print(json.dumps(llm.stats.as_dict()))
    return 0


def _verify_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--format", default="thinkprm", help="thinkprm | genprm | critic | a name from --formats-file")
    ap.add_argument("--formats-file", default=None, help="JSON file of user-defined verifier formats")
    ap.add_argument("--chains", type=int, default=8, help="K: parallel verification chains per solution")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=1024, help="per chain, all rounds together")
    ap.add_argument("--budget-tokens", type=int, default=None,
                    help="budget forcing: a chain that ends earlier is told to continue")
    ap.add_argument("--method", default="min", help="solution score: min | last | mean | product")
    ap.add_argument("--threshold", type=float, default=0.5, help="earliest error: first step scored below this")
    ap.add_argument("--verify-seed", type=int, default=0)


def _make_verifier(args: argparse.Namespace, llm):
    from prmkern.verify.formats import load_formats
    from prmkern.verify.protocols import Verifier, VerifyConfig
    if args.formats_file:
        load_formats(args.formats_file, replace=True)
    return Verifier(llm, VerifyConfig(format=args.format, num_chains=args.chains, temperature=args.temperature,
                                      top_p=args.top_p, max_tokens=args.max_tokens, budget_tokens=args.budget_tokens,
                                      method=args.method, threshold=args.threshold, seed=args.verify_seed))


def _verify_records(verifier, records, show_progress: bool, desc: str):
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc=desc, unit="solution", dynamic_ncols=True, file=sys.stderr)
    results = []
    batch = max(1, 64 // max(1, verifier.config.num_chains))  # solutions per engine batch: bounded memory
    for i in range(0, len(records), batch):
        results += verifier.verify(records[i:i + batch], progress=bar.update if bar else None)
    if bar is not None:
        bar.close()
    return results


def _verify_summary(llm, results, seconds: float) -> str:
    from collections import Counter
    counts: Counter = Counter()
    for r in results:
        if r.scores is not None:
            counts.update(r.scores.counts)
    chains = sum(len(r.chains) for r in results)
    failed = sum(r.error is not None for r in results)
    return (f"{len(results)} solutions ({failed} failed), verdicts {dict(counts)}\n"
            + summary(llm.stats.as_dict(), seconds, chains))


def _report_json(report: dict) -> dict:
    from dataclasses import asdict, is_dataclass
    return {k: asdict(v) if is_dataclass(v) else v for k, v in report.items()}


def _labelled_f1(records, results) -> dict | None:
    from prmkern.verify.processbench import evaluate_subsets
    subsets: dict[str, tuple[list, list]] = {}
    for rec, res in zip(records, results):
        if "label" not in rec:
            continue
        name = str(rec.get("subset") or str(rec.get("id", "all")).split("-")[0])
        labels, preds = subsets.setdefault(name, ([], []))
        labels.append(int(rec["label"]))
        preds.append(res.prediction)
    return _report_json(evaluate_subsets(subsets)) if subsets else None


def verdict_agreement(records, results, threshold: float) -> dict | None:
    """Against gold labels (ProcessBench convention: label = first wrong step, -1 none): the share of step verdicts
    that are right, over steps up to and including the first wrong one (later steps have no gold label), and the
    share of solutions whose predicted earliest error equals the label."""
    right = total = exact = labelled = 0
    for rec, res in zip(records, results):
        if "label" not in rec or res.error is not None:
            continue
        labelled += 1
        label = int(rec["label"])
        exact += res.prediction == label
        last = len(rec["steps"]) - 1 if label == -1 else label
        for i, step in enumerate(res.scores.steps[:last + 1] if res.scores else []):
            if step.score is not None:
                total += 1
                right += (step.score >= threshold) == (label == -1 or i < label)
    if not labelled:
        return None
    return {"step_verdicts_right": right / total if total else None, "scored_steps": total,
            "earliest_error_exact": exact / labelled, "solutions": labelled}


def cmd_verify(args: argparse.Namespace) -> int:
    from prmkern.verify.processbench import load_processbench, sample_path
    examples = shipped_verifier_dir() and f"{shipped_verifier_dir()}/examples.jsonl"
    if args.input is None:  # bundled records: synthetic held-out examples for the shipped verifier, else ProcessBench
        path = examples if args.model is None and examples else str(sample_path())
    else:
        path = str(sample_path()) if args.input == "processbench" else args.input
    records = load_processbench(path)
    if args.limit:
        records = records[:args.limit]
    llm = _make_llm(args, default="verifier")
    verifier = _make_verifier(args, llm)
    print(f"verifying {len(records)} solutions from {path} with {llm.config.model} "
          f"({args.format}, K={args.chains})", file=sys.stderr)
    start = time.perf_counter()
    results = _verify_records(verifier, records, not args.no_progress, "verify")
    seconds = time.perf_counter() - start
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    for res in results:
        out.write(json.dumps(res.to_json(llm.tokenizer, include_chains=not args.no_chains)) + "\n")
    if out is not sys.stdout:
        out.close()
    print(_verify_summary(llm, results, seconds), file=sys.stderr)
    agreement = verdict_agreement(records, results, args.threshold)
    if agreement is not None:
        share = agreement["step_verdicts_right"]
        print(f"against the gold labels: {'n/a' if share is None else f'{share:.1%}'} of "
              f"{agreement['scored_steps']} scored step verdicts right; earliest error exact on "
              f"{agreement['earliest_error_exact']:.1%} of {agreement['solutions']} solutions", file=sys.stderr)
        f1 = _labelled_f1(records, results)
        print(f"ProcessBench-style F1 on these labelled records: {json.dumps(f1)}", file=sys.stderr)
    return 0


def cmd_eval_processbench(args: argparse.Namespace) -> int:
    import os

    from prmkern.verify.processbench import evaluate_subsets, load_processbench
    llm = _make_llm(args, default="verifier")
    verifier = _make_verifier(args, llm)
    subsets = {}
    start = time.perf_counter()
    all_results = []
    for path in args.files:
        records = load_processbench(path)[:args.limit or None]
        results = _verify_records(verifier, records, not args.no_progress, os.path.basename(path))
        all_results += results
        subsets[os.path.splitext(os.path.basename(path))[0]] = (
            [int(r["label"]) for r in records],
            [res.prediction for res in results])
    seconds = time.perf_counter() - start
    report = _report_json(evaluate_subsets(subsets))
    print(_verify_summary(llm, all_results, seconds), file=sys.stderr)
    for name, r in report.items():
        if isinstance(r, dict):
            print(f"{name:>12}: F1 {r['f1']:.4f}  acc_err {r['acc_err']:.4f} (n={r['n_err']})  "
                  f"acc_ok {r['acc_ok']:.4f} (n={r['n_ok']})")
    print(json.dumps(report))
    return 0


def cmd_bon(args: argparse.Namespace) -> int:
    from prmkern.search import best_of_n
    records = _read_jsonl(args.input)
    if args.limit:
        records = records[:args.limit]
    llm = _make_llm(args, default="verifier")
    generator = llm if args.generator is None else _make_llm(argparse.Namespace(**{**vars(args),
                                                                                   "model": args.generator}))
    verifier = _make_verifier(args, llm)
    start = time.perf_counter()
    results = best_of_n(generator, verifier, records, n=args.n, select=args.select,
                        params=SamplingParams(temperature=args.gen_temperature, top_p=0.95,
                                              max_tokens=args.gen_max_tokens, seed=args.seed))
    seconds = time.perf_counter() - start
    graded = [r.correct for r in results if r.correct is not None]
    for rec, r in zip(records, results):
        c = r.chosen
        print(json.dumps({"id": rec.get("id"), "answer": c.answer if c else None, "score": c.score if c else None,
                          "correct": r.correct, "candidates": [{"answer": x.answer, "score": x.score}
                                                               for x in r.candidates]}))
    acc = f", accuracy {sum(graded) / len(graded):.3f} over {len(graded)}" if graded else ""
    print(f"best-of-{args.n} ({args.select}) on {len(records)} problems in {seconds:.2f} s{acc}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prmkern", description="Inference engine for generative process reward models")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="JSONL prompts in, JSONL completions out")
    _engine_args(g)
    g.add_argument("input", help="JSONL file ('-' for stdin): {prompt | prompt_token_ids, [sampling keys]} per line")
    g.add_argument("-o", "--output", default="-", help="JSONL output file (default stdout)")
    g.add_argument("--n", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", dest="top_p", type=float, default=None)
    g.add_argument("--top-k", dest="top_k", type=int, default=None)
    g.add_argument("--max-tokens", dest="max_tokens", type=int, default=None)
    g.add_argument("--sampling-seed", dest="seed", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="score every step of solutions with a generative verifier")
    _engine_args(v)
    _verify_args(v)
    v.add_argument("input", nargs="?", default=None,
                   help="ProcessBench-format .json or .jsonl of {problem, steps[, id, label]}; 'processbench' for "
                        "the bundled ProcessBench records (default: the shipped verifier's held-out examples)")
    v.add_argument("-o", "--output", default="-", help="JSONL results (default stdout)")
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("--no-chains", action="store_true", help="omit the chains' text from the output")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval", help="evaluations: `prmkern eval processbench FILE...`")
    esub = e.add_subparsers(dest="benchmark", required=True)
    pb = esub.add_parser("processbench", help="official ProcessBench F1 per subset and their mean")
    _engine_args(pb)
    _verify_args(pb)
    pb.add_argument("files", nargs="+", help="ProcessBench subset files (.json or .jsonl), one per subset")
    pb.add_argument("--limit", type=int, default=None, help="records per subset")
    pb.add_argument("--no-progress", action="store_true")
    pb.set_defaults(func=cmd_eval_processbench)

    b = sub.add_parser("bon", help="best-of-N: sample N solutions, pick by verifier score or weighted vote")
    _engine_args(b)
    _verify_args(b)
    b.add_argument("input", help="JSONL of {problem[, answer, id]}")
    b.add_argument("--n", type=int, default=8)
    b.add_argument("--select", default="score", choices=["score", "vote"])
    b.add_argument("--generator", default=None, help="generator checkpoint (default: the verifier's)")
    b.add_argument("--gen-temperature", type=float, default=0.8)
    b.add_argument("--gen-max-tokens", type=int, default=512)
    b.add_argument("--limit", type=int, default=None)
    b.set_defaults(func=cmd_bon)

    d = sub.add_parser("demo", help="many chains over one prompt on the embedded default model")
    _engine_args(d)
    d.add_argument("--chains", type=int, default=16)
    d.add_argument("--prompt-len", type=int, default=512)
    d.add_argument("--gen-len", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    args = ap.parse_args(argv)
    if args.command in ("generate", "verify"):
        from prmkern.distributed import data_parallel
        if data_parallel.active():  # under torchrun: this rank's share, merged by rank 0
            return data_parallel.run(args, args.func)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
