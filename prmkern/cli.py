"""The `prmkern` command line: generate (JSONL in, JSONL out) and demo (the embedded default model).

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
                 "stop_token_ids", "seed", "logprobs", "logprob_token_ids")


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


def _make_llm(args: argparse.Namespace):
    from prmkern.llm import LLM
    from prmkern.tiny import default_model_dir
    model = args.model or default_model_dir()
    return LLM(model, dtype=args.dtype, device=args.device, block_size=args.block_size,
               num_kvcache_blocks=args.num_kvcache_blocks, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
               seed=args.seed)


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

    d = sub.add_parser("demo", help="many chains over one prompt on the embedded default model")
    _engine_args(d)
    d.add_argument("--chains", type=int, default=16)
    d.add_argument("--prompt-len", type=int, default=512)
    d.add_argument("--gen-len", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
