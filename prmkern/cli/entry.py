"""The `prmkern` command line: generate, verify, eval processbench, bon, demo.

Every command that reads a JSONL writes one row per record as it finishes (prmkern/cli/jobs.py: flushed, a bad line
fails alone with its line number, `--resume`, `--summary FILE`). Configuration is checked before the model loads
and an error names the flag to change. Progress goes to stderr; results to -o (default stdout).
The verification commands live in verify.py and commands.py; this file holds the parser, the engine options, generate and demo.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from typing import Any

from prmkern import __version__
from prmkern.cli.jobs import Item, JobRunner, check_output_paths, read_items, write_summary
from prmkern.sampling_params import SamplingParams

SAMPLING_KEYS = ("n", "temperature", "top_k", "top_p", "min_tokens", "max_tokens", "ignore_eos", "stop",
                 "stop_token_ids", "include_stop_str_in_output", "seed", "logprobs", "logprob_token_ids",
                 "skip_special_tokens")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


class UsageError(SystemExit):
    """A configuration error found before anything heavy runs: printed as `prmkern: error: ...`, exit code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; accepted: bytes or a number with KiB/MiB/GiB/GB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    base = 1024 if (m.group(3) or "").lower() == "ib" or not m.group(3) else 1000
    value = float(m.group(1)) * base ** unit
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be > 0")
    return int(value)


def engine_args(ap: argparse.ArgumentParser, max_model_len: bool = True) -> None:
    g = ap.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (default: the shipped verifier for verify/eval/bon, the "
                        "random-weight model for generate/demo)")
    g.add_argument("--dtype", default="auto", help=f"{' | '.join(DTYPES[:4])} (auto: the checkpoint's)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a shared machine 1 avoids OpenMP stalls)")
    if max_model_len:
        g.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + generation in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for the KV cache, e.g. 4GiB (default: 40%% of available memory, at least 1 GiB, on the CPU, allocated untouched; 90%% of free memory on CUDA)")
    g.add_argument("--num-kvcache-blocks", type=int, default=None, help="KV pool size in blocks (overrides memory)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--max-num-seqs", type=int, default=256, help="chains running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096, help="tokens per engine step (chunked prefill)")
    g.add_argument("--attention-backend", default=None, help="torch | triton (default: triton on CUDA)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many GPUs (or CPU processes): docs/distributed.md")
    g.add_argument("--seed", type=int, default=0, help="engine seed")


def _engine_args(ap: argparse.ArgumentParser) -> None:
    """The engine options for `prmkern serve` (prmkern/cli/serve.py), which adds its own --max-model-len."""
    engine_args(ap, max_model_len=False)


def _verify_args(ap: argparse.ArgumentParser) -> None:
    """The verifier options (for `prmkern serve`)."""
    from prmkern.cli.verify import add_verify_args
    add_verify_args(ap)


def _make_verifier(args: argparse.Namespace, llm: Any):
    """A Verifier on `llm` from the verifier options (for `prmkern serve`); a bad option raises UsageError."""
    from prmkern.cli.verify import build_config
    from prmkern.verify.protocols import Verifier
    return Verifier(llm, build_config(args))


def _job_args(ap: argparse.ArgumentParser, unit: str, limit_help: str | None = None) -> None:
    ap.add_argument("-o", "--output", default="-", help="JSONL output, one row per record as it finishes ('-': stdout)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted job: keep the rows already in -o FILE and run only the rest")
    ap.add_argument("--summary", default=None, metavar="FILE",
                    help="write a JSON summary: counts, failures by reason and line, throughput, engine counters")
    ap.add_argument("--limit", type=int, default=None, help=limit_help or f"only the first N {unit}s of the input")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def shipped_verifier_dir() -> str | None:
    """The small generative verifier trained on the synthetic task (train/make_default_verifier.sh), if shipped."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "verifier")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def check_engine_args(args: argparse.Namespace) -> None:
    """Everything about the engine options that can be checked without loading the model."""
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model}: no config.json there; give a local Hugging Face checkpoint "
                         f"directory (nothing is downloaded)")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: accepted: {', '.join(DTYPES)}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: accepted: cpu, cuda, cuda:N")
    if args.device is not None and args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    for flag in ("threads", "max_model_len", "num_kvcache_blocks", "block_size", "max_num_seqs", "batch_size",
                 "max_num_batched_tokens"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {v}: accepted: an int >= 1")
    if args.attention_backend not in (None, "torch", "triton"):
        raise UsageError(f"--attention-backend {args.attention_backend}: accepted: torch, triton")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: accepted: an int >= 1")
    if getattr(args, "resume", False) and args.output == "-":
        raise UsageError("--resume continues the file given with -o; give -o FILE (stdout cannot be resumed)")


def make_llm(args: argparse.Namespace, default: str = "random"):
    """default: 'verifier' (the shipped verifier, else the random model) or 'random' (the random-weight model)."""
    from prmkern.llm import LLM
    from prmkern.tiny import default_model_dir
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    model = args.model or (default == "verifier" and shipped_verifier_dir()) or default_model_dir()
    try:
        return LLM(model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                   num_kvcache_blocks=args.num_kvcache_blocks, kv_cache_memory=args.kv_cache_memory,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_model_len=args.max_model_len, attention_backend=args.attention_backend, seed=args.seed,
                   enforce_eager=args.enforce_eager,
                   tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))
    except ValueError as e:  # the engine's config check: name the flag
        raise UsageError(f"{e} (set with --{str(e).split('=')[0].replace('_', '-')})") from e


def resume_hint(argv: list[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in words:
        words.append("--resume")
    return "prmkern " + " ".join(shlex.quote(w) for w in words)


def progress_bar(args: argparse.Namespace, total: int, desc: str, unit: str):
    """A tqdm bar on stderr (rate and ETA per record), or None with --no-progress."""
    if args.no_progress:
        return None
    from tqdm import tqdm
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


# -- generate --------------------------------------------------------------------------------------------------
def _generate_params(args: argparse.Namespace, rec: dict[str, Any]) -> SamplingParams:
    if "prompt" not in rec and "prompt_token_ids" not in rec:
        raise ValueError("a record needs 'prompt' (text) or 'prompt_token_ids' (list of ints)")
    unknown = set(rec) - set(SAMPLING_KEYS) - {"prompt", "prompt_token_ids", "id"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; accepted: prompt, prompt_token_ids, id, "
                         f"{', '.join(SAMPLING_KEYS)}")
    defaults = {k: getattr(args, k) for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")
                if getattr(args, k) is not None}
    return SamplingParams(**{**defaults, **{k: rec[k] for k in SAMPLING_KEYS if k in rec}})


def cmd_generate(args: argparse.Namespace) -> int:
    check_engine_args(args)
    items = read_items(args.input)[:args.limit or None]
    params: dict[int, SamplingParams] = {}
    for it in items:  # check every record before the model loads; a bad one fails alone
        if it.error is None:
            try:
                params[it.index] = _generate_params(args, it.record)
            except (TypeError, ValueError) as e:
                it.error = str(e)
    llm = make_llm(args)
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

    runner = JobRunner(args.output, args.resume, resume_hint(args.argv), inputs=[args.input])
    bar = progress_bar(args, len(items), "generate", "prompt")
    runner.run(items, process, batch_size=args.batch_size, progress=bar.update if bar else None, align=True)
    if bar is not None:
        bar.close()
    report_failures(runner, args.input)
    stats = llm.stats.as_dict()
    print(summary_line(stats, runner.seconds, chains), file=sys.stderr)
    write_summary(args.summary, runner.summary(len(items), stats, chains, command="generate", input=args.input,
                                               output=args.output))
    return 130 if runner.interrupted else 0


# -- demo ------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Many chains over one prompt on the embedded default: the prompt is prefilled once and shared."""
    check_engine_args(args)
    from prmkern.tiny import DEFAULT_MODEL
    llm = make_llm(args)
    print(f"model: {llm.config.model} ({DEFAULT_MODEL['arch']}, random weights)" if args.model is None
          else f"model: {args.model}", file=sys.stderr)
    words = "Problem: a train travels 120 km in 1.5 hours. Step 1: speed = 120 / 1.5 = 80 km/h. Verify each step."
    prompt_ids = (llm.tokenizer.encode(words, add_special_tokens=False) * 64)[:args.prompt_len]
    params = SamplingParams(n=args.chains, temperature=1.0, max_tokens=args.gen_len, ignore_eos=True, seed=0)
    start = time.perf_counter()
    out = llm.generate([prompt_ids], params, use_tqdm=not args.no_progress)[0]
    seconds = time.perf_counter() - start
    print(f"{len(out.outputs)} chains of {args.gen_len} tokens over one {len(prompt_ids)}-token prompt; chain 0 "
          f"starts: {out.outputs[0].text[:60]!r}")
    print(summary_line(llm.stats.as_dict(), seconds, len(out.outputs)))
    print(json.dumps(llm.stats.as_dict()))
    return 0


# -- the parser ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from prmkern.cli import verify as cli_verify
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="prmkern", formatter_class=fmt,
                                 description="Inference engine for generative process reward models")
    ap.add_argument("--version", action="version", version=f"prmkern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="JSONL prompts in, JSONL completions out", formatter_class=fmt)
    g.add_argument("input", help="JSONL file ('-' for stdin): {prompt | prompt_token_ids, [id], [sampling keys]}")
    _job_args(g, "prompt")
    g.add_argument("--n", type=int, default=None, help="chains per prompt (default: SamplingParams' 1)")
    g.add_argument("--temperature", type=float, default=None, help="(default: SamplingParams' 1.0)")
    g.add_argument("--top-p", dest="top_p", type=float, default=None, help="(default: 1.0)")
    g.add_argument("--top-k", dest="top_k", type=int, default=None, help="(default: off)")
    g.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="(default: SamplingParams' 16)")
    g.add_argument("--sampling-seed", dest="seed", type=int, default=None, help="seed of every request without its own")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per engine batch (rows are written per batch)")
    engine_args(g)
    g.set_defaults(func=cmd_generate)

    cli_verify.add_parsers(sub, fmt, engine_args, _job_args)

    d = sub.add_parser("demo", help="many chains over one prompt on the embedded random-weight model",
                       formatter_class=fmt)
    d.add_argument("--chains", type=int, default=16, help="chains over the one prompt")
    d.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    d.add_argument("--gen-len", type=int, default=64, help="tokens generated per chain")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine_args(d)
    d.set_defaults(func=cmd_demo)

    from prmkern.cli.serve import add_serve_parser  # the HTTP server (docs/server.md)
    add_serve_parser(sub)
    return ap


def _check_job_paths(args: argparse.Namespace) -> None:
    """Before anything loads or is written: no output (-o, --summary) may be one of the command's inputs."""
    if not hasattr(args, "output"):
        return
    if args.command == "verify":
        from prmkern.cli.verify import default_input
        inputs = [default_input(args)]
    else:
        inputs = [p for p in [getattr(args, "input", None), *(getattr(args, "files", None) or [])] if p]
    check_output_paths(inputs, {"-o": args.output, "--summary": getattr(args, "summary", None)})


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_job_paths(args)
        if args.command in ("generate", "verify"):
            from prmkern.distributed import data_parallel
            if data_parallel.active():  # under torchrun: this rank's share, merged by rank 0
                return data_parallel.run(args, args.func)
        return args.func(args)
    except UsageError as e:
        ap.exit(2, f"prmkern {args.command}: error: {e.message}\n")
    return 0

