"""The options every command shares: the engine's, derived from EngineConfig, and the job's (-o, --resume, ...).

One flag per `EngineConfig` field (its type, default and `metadata["help"]` make the flag), plus the two that
are not engine settings: `--tensor-parallel-size` (how many processes hold the model) and `--threads` (this
process's torch threads). `add_engine_args` puts them on a command, `check_engine_args` checks them before a model
loads (EngineConfig's own rules, errors naming the flag), and `make_llm` is the one place a command, or the server,
turns them into an `LLM`: every command passes every engine flag the same way. Nothing here runs a command.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
from typing import Any

import torch

from prmkern.attention.backend import backend_class, backend_names
from prmkern.cli import shards
from prmkern.cli.vllm_flags import add_vllm_flags, llm_kwargs
from prmkern.config import EngineConfig, EngineConfigError, check_values
from prmkern.llm import LLM, resolve_device
from prmkern.models.loader import DTYPES as DTYPE_NAMES
from prmkern.tiny import default_model_dir
from prmkern.verify.pruning import PRUNE_RULES, check_prune

DTYPES = ("auto", *DTYPE_NAMES)
# model, dtype and device are taken as text (LLM resolves them: a directory, "auto", the default device)
TEXT_FIELDS = ("model", "dtype", "device")
ENGINE_FIELDS = tuple(f for f in dataclasses.fields(EngineConfig) if f.name not in TEXT_FIELDS)
# engine options that are not EngineConfig fields: (dest, default, help)
PROCESS_OPTIONS = (
    ("tensor_parallel_size", 1, "split the model over this many GPUs (or CPU processes): docs/distributed.md"),
    ("threads", None, "torch CPU threads (default: torch's; on a shared machine 1 avoids OpenMP stalls)"),
)


class UsageError(SystemExit):
    """A configuration error found before anything heavy runs: printed as `prmkern CMD: error: ...`, exit 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def parse_size(text: str, allow_zero: bool = False) -> int:
    """'4GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; accepted: bytes or a number with KiB/MiB/GiB/GB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    base = 1024 if (m.group(3) or "").lower() == "ib" or not m.group(3) else 1000
    try:
        value = float(m.group(1)) * base ** unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; accepted: bytes or a number with KiB/MiB/GiB/GB")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be > 0" + (" (0 disables)" if allow_zero else ""))
    return int(value)


def parse_bytes(text: str) -> int:
    return parse_size(text)


def parse_bytes_or_zero(text: str) -> int:
    return parse_size(text, allow_zero=True)


_TYPES = {"int": int, "float": float, "str": str}


def _field_argument(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords for an EngineConfig field: its default, its help, and a parser for its type."""
    base = str(f.type).split("|")[0].strip()  # "int | None" -> "int" (annotations are strings here)
    help_text = f.metadata["help"].replace("%", "%%")
    if base == "bool":
        if f.default:  # --enable-prefix-caching / --no-enable-prefix-caching
            return {"action": argparse.BooleanOptionalAction, "default": True, "help": help_text}
        return {"action": "store_true", "help": help_text}
    if f.metadata.get("size"):
        kind = parse_bytes_or_zero if f.metadata.get("zero") else parse_bytes
    else:
        kind = _TYPES[base]
    return {"type": kind, "default": f.default, "help": help_text}


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """Every engine option, once, on one command's parser."""
    g = ap.add_argument_group("engine")
    helps = {f.name: f.metadata["help"].replace("%", "%%") for f in dataclasses.fields(EngineConfig)
             if f.name in TEXT_FIELDS}
    g.add_argument("--model", default=None, help=helps["model"])
    g.add_argument("--dtype", default="auto", help=helps["dtype"])
    g.add_argument("--device", default=None, help=helps["device"])
    for f in ENGINE_FIELDS:
        kw = _field_argument(f)
        if f.name == "attention_backend":
            kw["help"] = f"{' | '.join(backend_names())}: {kw['help']}"
        g.add_argument(flag(f.name), **kw)
    for dest, default, help_text in PROCESS_OPTIONS:
        g.add_argument(flag(dest), type=int, default=default, help=help_text)
    add_vllm_flags(ap.add_argument_group("vLLM's flags"))  # vLLM's flags that are not EngineConfig fields


def add_job_args(ap: argparse.ArgumentParser, unit: str, limit_help: str | None = None) -> None:
    """The options of a command that reads a JSONL and writes one row per record."""
    ap.add_argument("-o", "--output", default="-", help="JSONL output, one row per record as it finishes ('-': stdout)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted job: keep the rows already in -o FILE and run only the rest")
    ap.add_argument("--summary", default=None, metavar="FILE",
                    help="write a JSON summary: counts, failures by reason and line, throughput, engine counters")
    ap.add_argument("--limit", type=int, default=None, help=limit_help or f"only the first N {unit}s of the input")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_search_args(ap: argparse.ArgumentParser) -> None:
    """The options of a search that verifies candidates (bon): pruning on streamed verdicts."""
    ap.add_argument("--prune", nargs="?", const="exact", default=None, choices=PRUNE_RULES,
                    help="drop a candidate whose earliest error is decided (its chains aborted, its blocks freed) "
                         "while the others go on in the same batch; exact (the default when given bare): once a "
                         "sibling is known to score above it, so the choice is the unpruned one; error: at once "
                         "(the same choice whenever the chosen candidate scores at or above the threshold). Needs "
                         "--select score, --method min, a step-verdict format (thinkprm, prmkern), no "
                         "--budget-tokens and no --stop-at-first-error (docs/early_exit.md)")


def check_search_args(args: argparse.Namespace, config: Any) -> None:
    """UsageError, before a model loads, when --prune cannot apply to the other options."""
    if getattr(args, "prune", None) is None:
        return
    if getattr(args, "select", "score") != "score":
        raise UsageError(f"--prune applies to --select score only: a weighted vote sums every candidate's score, so "
                         f"dropping one can change the vote; got --select {args.select}")
    try:
        check_prune(args.prune, config)
    except ValueError as e:
        message = str(e)
        message = "--" + message if message.startswith("prune ") else message
        for word, name in (("--prune=", "--prune "), ("budget_tokens=None", "no --budget-tokens"),
                           ("(budget_tokens)", "(--budget-tokens)"), ("method ", "--method "),
                           ("format ", "--format "), ("stop_at_first_error", "--stop-at-first-error"),
                           ("chains_min=", "--chains-min "), ("num_chains alone", "--chains alone")):
            message = message.replace(word, name)
        raise UsageError(message) from e


def shipped_verifier_dir() -> str | None:
    """The small generative verifier trained on the synthetic task (train/make_default_verifier.sh), if shipped."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "verifier")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def check_engine_args(args: argparse.Namespace) -> None:
    """Everything about the engine (and job) options that can be checked without loading the model."""
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model}: no config.json there; give a local Hugging Face checkpoint "
                         f"directory (nothing is downloaded)")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: accepted: {', '.join(DTYPES)}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: accepted: cpu, cuda, cuda:N")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    for name in ("threads", "tensor_parallel_size", "batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"{flag(name)} {v}: accepted: an int >= 1")
    names = backend_names()
    if args.attention_backend is not None and args.attention_backend not in names:
        raise UsageError(f"--attention-backend {args.attention_backend}: accepted: {', '.join(names)}")
    if args.attention_backend is not None:  # on the device LLM will pick
        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise UsageError(f"--device {args.device}: {e}") from None
        why = backend_class(args.attention_backend).unavailable_on(device)
        if why is not None:
            raise UsageError(f"--attention-backend {args.attention_backend}: {why}")
    try:  # EngineConfig's own rules, on the values given
        check_values(types.SimpleNamespace(**{f.name: getattr(args, f.name) for f in ENGINE_FIELDS}))
    except EngineConfigError as e:
        raise UsageError(f"{flag(e.field)} {e.value}: accepted: {e.accepted}") from e
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: accepted: an int >= 1")
    if getattr(args, "resume", False) and args.output == "-":
        raise UsageError("--resume continues the file given with -o; give -o FILE (stdout cannot be resumed)")
    if hasattr(args, "output") and shards.Shard.from_env() is not None:  # a job under torchrun
        shards.check_job(args.output, getattr(args, "input", None))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM's keyword arguments from the engine options (all but the model and --threads)."""
    return {"dtype": args.dtype, "device": args.device, **{f.name: getattr(args, f.name) for f in ENGINE_FIELDS},
            "tensor_parallel_size": args.tensor_parallel_size, **llm_kwargs(args)}


def make_llm(args: argparse.Namespace, default: str = "random") -> LLM:
    """The LLM of a command (and of the server) from its engine options. default, when --model is not given:
    'verifier' (the shipped verifier, else the random model) or 'random' (the random-weight model)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = shards.Shard.from_env()
    if shard is not None and args.device in (None, "cuda") and torch.cuda.is_available():
        # a data-parallel rank: one GPU each (T consecutive GPUs with a T-way tensor-parallel engine inside)
        args.device = f"cuda:{shard.local_rank * (args.tensor_parallel_size or 1)}"
    model = args.model or (default == "verifier" and shipped_verifier_dir()) or default_model_dir()
    try:
        return LLM(model, **engine_kwargs(args))
    except EngineConfigError as e:  # the engine's config check: name the flag
        raise UsageError(f"{e} (set with {flag(e.field)})") from e
    except ValueError as e:
        named = re.match(r"(?:\w+\.)?(\w+)=", str(e))  # "LLM.max_model_len=..." names its argument; others do not
        raise UsageError(f"{e} (set with {flag(named.group(1))})" if named else str(e)) from e
