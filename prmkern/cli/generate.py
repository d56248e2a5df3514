"""`prmkern generate` (JSONL prompts in, JSONL completions out) and `prmkern demo` (many chains, one prompt).

The sampling options here are per request (SamplingParams); the engine's are options.py's, as in every command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from prmkern.cli import options
from prmkern.cli.jobs import Item, JobRunner, read_items, write_summary
from prmkern.cli.options import UsageError
from prmkern.cli.report import progress_bar, report_failures, resume_hint, summary_line
from prmkern.sampling_params import SamplingParams
from prmkern.tiny import DEFAULT_MODEL

# Every SamplingParams argument, as the Python API takes them (a generate record may set any of them).
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.init)
# record key <- option dest, for the defaults of records that do not set them
_DEFAULTS = {"n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_tokens": "max_tokens",
             "seed": "sampling_seed"}


def generate_params(args: argparse.Namespace, rec: dict[str, Any]) -> SamplingParams:
    """A record's SamplingParams: its own keys over the command's sampling options."""
    if ("prompt" in rec) == ("prompt_token_ids" in rec):
        raise ValueError("a record needs 'prompt' (text) or 'prompt_token_ids' (list of ints), one of them; got "
                         + ("both" if "prompt" in rec else f"keys {sorted(rec)}"))
    if "prompt" in rec and not isinstance(rec["prompt"], str):
        raise ValueError(f"'prompt' is a {type(rec['prompt']).__name__}; accepted: a string (token ids go in "
                         f"'prompt_token_ids')")
    ids = rec.get("prompt_token_ids")
    if "prompt_token_ids" in rec and (not isinstance(ids, list) or not ids or
                                      any(isinstance(t, bool) or not isinstance(t, int) for t in ids)):
        raise ValueError(f"'prompt_token_ids' is {json.dumps(ids)[:60]}; accepted: a non-empty list of int token ids")
    unknown = set(rec) - set(SAMPLING_KEYS) - {"prompt", "prompt_token_ids", "id"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; accepted: prompt, prompt_token_ids, id, "
                         f"{', '.join(SAMPLING_KEYS)}")
    defaults = {k: getattr(args, dest) for k, dest in _DEFAULTS.items() if getattr(args, dest) is not None}
    return SamplingParams(**{**defaults, **{k: rec[k] for k in SAMPLING_KEYS if k in rec}})


def cmd_generate(args: argparse.Namespace) -> int:
    options.check_engine_args(args)
    items = read_items(args.input)[:args.limit or None]
    params: dict[int, SamplingParams] = {}
    for it in items:  # check every record before the model loads; a bad one fails alone
        if it.error is None:
            try:
                params[it.index] = generate_params(args, it.record)
            except (TypeError, ValueError) as e:
                it.error = str(e)
    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=[args.input])
    with runner.locked():  # before the model: a second run on this output stops at once
        llm = options.make_llm(args)
    chains = 0

    def process(batch: list[Item], emit) -> None:
        nonlocal chains
        outs = llm.generate([it.record.get("prompt", it.record.get("prompt_token_ids")) for it in batch],
                            [params[it.index] for it in batch], use_tqdm=False)
        for it, r in zip(batch, outs):
            chains += len(r.outputs)
            emit(it.index, it.row(error=r.error, outputs=[
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                 **({"logprobs": c.sampled_logprobs} if c.logprobs is not None else {}),
                 **({"token_logprobs": c.token_logprobs} if c.token_logprobs is not None else {})}
                for c in r.outputs]))

    bar = progress_bar(args, len(items), "generate", "prompt")
    runner.run(items, process, batch_size=args.batch_size, progress=bar.update if bar else None, align=True)
    if bar is not None:
        bar.close()
    if not runner.writes_summary:
        return 0
    report_failures(runner, args.input)
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="generate", input=args.input,
                                               output=args.output))
    return 130 if runner.interrupted else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Many chains over one prompt on the embedded default: the prompt is prefilled once and shared."""
    options.check_engine_args(args)
    for flag, value in (("--chains", args.chains), ("--gen-len", args.gen_len), ("--prompt-len", args.prompt_len)):
        if value < 1:
            raise UsageError(f"{flag} {value} is invalid; accepted: an int >= 1")
    llm = options.make_llm(args)
    print(f"model: {llm.config.model} ({DEFAULT_MODEL['arch']}, random weights)" if args.model is None
          else f"model: {args.model}", file=sys.stderr)
    words = "Problem: a train travels 120 km in 1.5 hours. Step 1: speed = 120 / 1.5 = 80 km/h. Verify each step."
    prompt_ids = (llm.tokenizer.encode(words, add_special_tokens=False) * 64)[:args.prompt_len]
    params = SamplingParams(n=args.chains, temperature=1.0, max_tokens=args.gen_len, ignore_eos=True, seed=0)
    start = time.perf_counter()
    out = llm.generate([prompt_ids], params, use_tqdm=not args.no_progress)[0]
    seconds = time.perf_counter() - start
    if out.error is not None:  # e.g. a prompt longer than the context (--prompt-len)
        raise UsageError(f"the demo's request failed: {out.error}")
    print(f"{len(out.outputs)} chains of {args.gen_len} tokens over one {len(prompt_ids)}-token prompt; chain 0 "
          f"starts: {out.outputs[0].text[:60]!r}")
    print(summary_line(llm.stats.as_dict(), seconds, len(out.outputs)))
    print(json.dumps(llm.stats.as_dict()))
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    g = sub.add_parser("generate", help="JSONL prompts in, JSONL completions out", formatter_class=fmt)
    g.add_argument("input", help="JSONL file ('-' for stdin): {prompt | prompt_token_ids, [id], [sampling keys]}")
    options.add_job_args(g, "prompt")
    g.add_argument("--n", type=int, default=None, help="chains per prompt (default: SamplingParams' 1)")
    g.add_argument("--temperature", type=float, default=None, help="(default: SamplingParams' 1.0)")
    g.add_argument("--top-p", dest="top_p", type=float, default=None, help="(default: 1.0)")
    g.add_argument("--top-k", dest="top_k", type=int, default=None, help="(default: off)")
    g.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="(default: SamplingParams' 16)")
    g.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None,
                   help="seed of every request without its own (the engine's --seed is separate)")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per engine batch (rows are written per batch)")
    options.add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="many chains over one prompt on the embedded random-weight model",
                       formatter_class=fmt)
    d.add_argument("--chains", type=int, default=16, help="chains over the one prompt")
    d.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    d.add_argument("--gen-len", type=int, default=64, help="tokens generated per chain")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_engine_args(d)
    d.set_defaults(func=cmd_demo)
