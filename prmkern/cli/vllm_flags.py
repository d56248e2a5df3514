"""vLLM's engine flags on prmkern's commands, with vLLM's meaning where prmkern has the feature, accepted and ignored
with a warning where it does not: the ones that are not EngineConfig fields (those, --gpu-memory-utilization and
--enable-prefix-caching among them, come from prmkern/cli/options.py). Added by options.add_engine_args.

  --tokenizer DIR              tokenizer folder (default: the model's)
  --generation-config auto|vllm|DIR   sampling defaults from generation_config.json (vLLM's meaning)
  --trust-remote-code          accepted; prmkern runs no checkpoint code (warned)
  --kv-cache-memory-bytes      vLLM's spelling of --kv-cache-memory (declared there)
and, accepted with a warning because they configure nothing prmkern has: IGNORED_FLAGS.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

# flag -> (takes a value, why it is ignored)
IGNORED_FLAGS = {
    "--disable-log-stats": (False, "prmkern logs no periodic stats"),
    "--disable-log-requests": (False, "prmkern does not log request contents"),
    "--enable-log-requests": (False, "prmkern does not log request contents"),
    "--swap-space": (True, "preempted chains are recomputed from the prefix cache, not swapped"),
    "--enable-chunked-prefill": (False, "chunked prefill is always on"),
    "--disable-custom-all-reduce": (False, "no custom all-reduce"),
    "--uvicorn-log-level": (True, "use --log-level"),
}


def add_vllm_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's own)")
    g.add_argument("--generation-config", default="auto",
                   help="vLLM's: sampling defaults from generation_config.json: auto (the model's), vllm (none), "
                        "or a folder holding one")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM compatibility; prmkern runs no code from checkpoints")
    for flag, (takes_value, why) in IGNORED_FLAGS.items():
        if takes_value:
            g.add_argument(flag, default=None, metavar="X", help=f"accepted and ignored: {why}")
        else:
            g.add_argument(flag, action="store_const", const=True, default=None, help=f"accepted and ignored: {why}")


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(...) keyword arguments from the vLLM flags; warns once per ignored flag given."""
    for flag, (_, why) in IGNORED_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_"), None) is not None:
            print(f"warning: {flag} is accepted for vLLM compatibility and ignored: {why}", file=sys.stderr)
    out: dict[str, Any] = {}
    if args.tokenizer is not None:
        out["tokenizer"] = args.tokenizer
    if args.generation_config != "auto":
        out["generation_config"] = args.generation_config
    if args.trust_remote_code:
        out["trust_remote_code"] = True
    return out
