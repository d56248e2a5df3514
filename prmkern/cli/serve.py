"""`prmkern serve [MODEL]`: the command line of the HTTP server (registered by prmkern/cli/entry.py).

The engine options and the LLM are options.py's, as in every other command (so --kv-cache-memory,
--enforce-eager, --tensor-parallel-size, --threads, ... mean the same here); the verifier options are verify.py's.
`add_serve_parser` needs only argparse, so `prmkern --help` works without the server's extras installed;
`run_serve` imports FastAPI and uvicorn (an optional extra, not an import cycle) and says how to install them when
they are missing.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from prmkern.cli import options
from prmkern.cli.verify import add_verify_args, build_config, given_options
from prmkern.verify.sessions import SessionLimits


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, verify) on one engine")
    s.add_argument("model_dir", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face checkpoint directory (default: --model, else the shipped verifier)")
    options.add_engine_args(s)
    add_verify_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 = all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("PRMKERN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PRMKERN_API_KEY, else none)")
    s.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: the directory name)")
    s.add_argument("--max-pending", type=int, default=512,
                   help="requests queued or running in the engine before new ones get HTTP 503")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20)
    s.add_argument("--max-n", type=int, default=64, help="most chains per prompt (n, num_chains)")
    s.add_argument("--max-prompts", type=int, default=64, help="most prompts in one /v1/completions call")
    s.add_argument("--max-verify", type=int, default=64,
                   help="verify calls running at once (worker threads); more wait for a worker, none is refused")
    s.add_argument("--max-pending-tokens", type=int, default=1 << 20,
                   help="tokens admitted (prompts + n * max_tokens of unanswered calls) before new calls get 503 "
                        "with Retry-After; below it calls queue in the engine's scheduler")
    s.add_argument("--max-solutions", type=int, default=64, help="most solutions in one batch /v1/verify call")
    s.add_argument("--max-sessions", type=int, default=1024,
                   help="open /v1/sessions; past it the least recently used idle session is closed")
    s.add_argument("--max-pinned-sessions", type=int, default=256,
                   help="/v1/sessions holding pinned KV (SessionLimits.max_sessions); past it the least recently used "
                        "is unpinned (it stays valid)")
    s.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs / prompt_logprobs per position (vLLM's max_logprobs)")
    s.add_argument("--max-token-ids", type=int, default=256,
                   help="longest stop_token_ids / logprob_token_ids list (and logit_bias dict) in one request")
    s.add_argument("--allow-code-execution", action="store_true",
                   help="let /v1/verify run model-written Python in the sandbox (format genprm); off by default")
    s.add_argument("--max-connections", type=int, default=None,
                   help="open connections held at once (default: half the file descriptors above a reserve); "
                        "beyond it the oldest idle connection is closed, or the newcomer gets 503")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send its request headers (and a request its body)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before answering them 503")
    s.add_argument("--chat-template", default=None,
                   help="vLLM's: a Jinja chat template (a file, or the template text) replacing the tokenizer's")
    s.add_argument("--log-level", default="info", type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.set_defaults(func=run_serve)
    return s


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from prmkern.serve.app import ServerConfig, build_app
        from prmkern.serve.connections import uvicorn_kwargs
    except ImportError as e:
        raise SystemExit(f"prmkern serve needs FastAPI and uvicorn ({e}); install them with "
                         f"`pip install 'prmkern[serve]'`")
    if args.model_dir and args.model and os.path.realpath(args.model_dir) != os.path.realpath(args.model):
        raise SystemExit(f"prmkern serve: error: two models given: {args.model_dir} and --model {args.model}; "
                         f"give one (`prmkern serve MODEL` and `prmkern serve --model MODEL` are the same)")
    args.model = args.model_dir or args.model  # one name from here on: the verifier's defaults follow it
    chat_template = None
    if args.chat_template is not None:  # vLLM's: a file holding the template, or the template itself
        chat_template = args.chat_template
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
    options.check_engine_args(args)
    verify_config = build_config(args)  # the verifier options, checked before the model loads
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"prmkern serve: --port {args.port} is invalid; accepted: an int in [0, 65535]")
    server_args = _server_args(args, chat_template)
    try:  # the server's limits, checked before the model loads (the same ServerConfig is built after it)
        ServerConfig(model_name="-", **server_args)
    except (TypeError, ValueError) as e:  # "ServerConfig.max_n=0 is invalid" names the flag --max-n
        flag = lambda m: f"--{m.group(1).replace('_', '-')} "  # noqa: E731
        raise SystemExit("prmkern serve: " + re.sub(r"ServerConfig\.(\w+)=", flag, str(e)))
    llm = options.make_llm(args, default="verifier")
    if llm.tokenizer is None:
        print("warning: the checkpoint has no tokenizer; only token-id prompts on /v1/completions will work",
              file=sys.stderr)
        verify_config = None
    if verify_config is not None and verify_config.format.code_regex is not None and not args.allow_code_execution:
        raise SystemExit(f"prmkern serve: --format {verify_config.format.name} runs the model's Python code for "
                         f"every /v1/verify call; add --allow-code-execution to allow it")
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.config.model))
    for flag, value in (("--max-sessions", args.max_sessions), ("--max-pinned-sessions", args.max_pinned_sessions)):
        if value < 1:
            raise SystemExit(f"prmkern serve: {flag} {value} is invalid; accepted: an int >= 1")
    config = ServerConfig(model_name=name, **server_args, **({"verify": verify_config} if verify_config else {}))
    app = build_app(llm, config)
    try:
        limits = uvicorn_kwargs(args.max_connections, args.header_timeout)
    except ValueError as e:
        raise SystemExit(f"prmkern serve: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"serving {llm.config.model} as {name!r} on http://{args.host}:{args.port} "
          f"(KV pool {llm.engine.num_blocks} blocks of {llm.config.block_size}, context {llm.engine.max_model_len})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout, **limits)
    return 0


def _server_args(args: argparse.Namespace, chat_template: str | None) -> dict:
    """ServerConfig's fields from the flags (all but the model name and the verifier config)."""
    return dict(api_key=args.api_key, max_pending=args.max_pending, max_request_bytes=args.max_request_bytes,
                max_n=args.max_n, max_prompts=args.max_prompts, max_verify=args.max_verify,
                max_pending_tokens=args.max_pending_tokens, max_solutions=args.max_solutions,
                max_sessions=args.max_sessions, session_limits=SessionLimits(max_sessions=args.max_pinned_sessions),
                verify_options=given_options(args), chat_template=chat_template, max_logprobs=args.max_logprobs,
                max_token_ids=args.max_token_ids, allow_code_execution=args.allow_code_execution,
                request_timeout_s=args.header_timeout)
