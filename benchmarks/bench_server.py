"""The HTTP server under concurrent clients, and what the HTTP layer adds to a verify call whose prompt is cached.

1. N concurrent clients (asyncio + httpx, loopback) each send R greedy /v1/completions requests back to back:
   requests/s, generated tokens/s and p50/p99 latency; the same prompts through the offline API (one
   LLM.generate batch) give the engine's own throughput for comparison.
2. A /v1/verify call whose prompt is in the prefix cache, through the server, against the same call in-process
   (Verifier on a second LLM of the same checkpoint), alternated call by call so that machine noise hits both.

The server runs in this process on a background thread (prmkern.serve.background). The last stdout line is one
JSON document.

  python benchmarks/bench_server.py                       # embedded default model
  python benchmarks/bench_server.py --clients 64 --requests 4 --max-tokens 64 --model DIR
  python benchmarks/bench_server.py --smoke
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import git_commit  # noqa: E402
from benchmarks.roofline import cpu_model  # noqa: E402
from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402
from prmkern.tiny import default_model_dir  # noqa: E402
from prmkern.verify.processbench import load_processbench, sample_path  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def run_clients(url: str, prompts: list[list[list[int]]], max_tokens: int) -> tuple[float, list[float], int]:
    """prompts[c] is client c's list of requests, sent one after another. Returns wall seconds, latencies, tokens."""
    import httpx
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient, mine: list[list[int]]) -> None:
        nonlocal tokens
        for prompt in mine:
            t = time.perf_counter()
            r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "ignore_eos": True})
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, mine) for mine in prompts))
        return time.perf_counter() - start, latencies, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded random model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, sent back to back")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--verify-chains", type=int, default=4)
    ap.add_argument("--verify-max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7, help="verify calls timed on each side")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds on each side (best kept)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.requests, args.prompt_len, args.max_tokens = 4, 2, 16, 4
        args.verify_chains, args.verify_max_tokens, args.repeats, args.rounds = 2, 4, 2, 1
    model = args.model or default_model_dir()
    llm = LLM(model, device=args.device)
    vocab = llm.engine.model.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    # Fresh prompts for every round (no prefix-cache hits between rounds), the same ones for both sides.
    rounds = [[[torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
               for _ in range(args.clients)] for _ in range(args.rounds)]
    ref = LLM(model, device=args.device)  # the offline side: the same checkpoint on its own engine
    for warm in (llm, ref):  # first-call costs out of the way on both sides
        warm.generate([rounds[0][0][0]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    record = load_processbench(sample_path())[0]
    config = VerifyConfig(num_chains=args.verify_chains, max_tokens=args.verify_max_tokens, seed=0)
    in_process = Verifier(ref, config)
    body = {"problem": record["problem"], "steps": record["steps"], "include_chains": False}
    app = build_app(llm, ServerConfig(model_name="bench", max_pending=max(512, args.clients * 2), verify=config))
    with serve_in_thread(app) as url:
        import httpx
        offline_s, served = [], []
        for prompts in rounds:  # alternate offline and served rounds: machine noise hits both; keep the best
            flat = [p for mine in prompts for p in mine]
            t = time.perf_counter()
            ref.generate(flat, params, use_tqdm=False)
            offline_s.append(time.perf_counter() - t)
            served.append(asyncio.run(run_clients(url, prompts, args.max_tokens)))
        wall, latencies, tokens = min(served, key=lambda r: r[0])
        server_ms, local_ms = [], []
        with httpx.Client(base_url=url, timeout=600) as http:
            http.post("/v1/verify", json=body).raise_for_status()  # warm: the prompt enters the prefix cache
            in_process.verify([record])
            for _ in range(args.repeats):  # alternate, so that load on this machine hits both sides alike
                t = time.perf_counter()
                r = http.post("/v1/verify", json=body)
                server_ms.append((time.perf_counter() - t) * 1e3)
                r.raise_for_status()
                t = time.perf_counter()
                in_process.verify([record])
                local_ms.append((time.perf_counter() - t) * 1e3)
    n = len(latencies)
    result = dict(
        bench="server", smoke=args.smoke, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model(),
        cpus=os.cpu_count(), commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=model,
        clients=args.clients, requests_per_client=args.requests, prompt_len=args.prompt_len,
        max_tokens=args.max_tokens, requests=n, wall_s=round(wall, 3), requests_per_s=round(n / wall, 2),
        generated_tok_per_s=round(tokens / wall, 1), p50_ms=round(percentile(latencies, 50) * 1e3, 1),
        p99_ms=round(percentile(latencies, 99) * 1e3, 1),
        offline_generated_tok_per_s=round(args.clients * args.requests * args.max_tokens / min(offline_s), 1),
        rounds=args.rounds,
        verify_chains=args.verify_chains, verify_max_tokens=args.verify_max_tokens,
        verify_cached_server_ms=round(statistics.median(server_ms), 2),
        verify_cached_in_process_ms=round(statistics.median(local_ms), 2))
    result["verify_server_over_in_process"] = round(result["verify_cached_server_ms"]
                                                    / result["verify_cached_in_process_ms"], 3)
    print(f"best of {args.rounds} rounds: {args.clients} clients x {args.requests} requests "
          f"({args.prompt_len}-token prompts, {args.max_tokens} greedy tokens): {result['requests_per_s']} req/s, {result['generated_tok_per_s']} tok/s "
          f"(offline batch: {result['offline_generated_tok_per_s']} tok/s), p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms")
    print(f"verify, prompt cached, K={args.verify_chains}: server {result['verify_cached_server_ms']} ms, "
          f"in-process {result['verify_cached_in_process_ms']} ms (x{result['verify_server_over_in_process']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
