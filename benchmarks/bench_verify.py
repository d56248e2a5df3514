"""Verification throughput and the latency of a verify call whose prompt is already in the prefix cache.

Runs the Verifier (K chains per solution) over ProcessBench-format records twice on one engine: the first pass
prefills every prompt, the second finds them cached. Prints chains/s, tokens/s and per-call latencies; the last
stdout line is one JSON document.

  python benchmarks/bench_verify.py                    # embedded default model, bundled records
  python benchmarks/bench_verify.py --model DIR --records FILE --chains 8 --max-tokens 1024
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import git_commit  # noqa: E402
from prmkern import LLM  # noqa: E402
from prmkern.tiny import default_model_dir  # noqa: E402
from prmkern.verify.processbench import load_processbench, sample_path  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--records", default=None)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--format", default="prmkern")  # the format earlier numbers were measured with
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default); 1 because OpenMP threads stall on a shared machine")
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.chains, args.max_tokens = 2, 2, 8
    if args.threads < 0:
        raise SystemExit(f"--threads {args.threads}: accepted: 0 (torch's default) or an int >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    model = args.model or default_model_dir()
    records = load_processbench(args.records or sample_path())[:args.limit]
    llm = LLM(model, device=args.device)
    verifier = Verifier(llm, VerifyConfig(format=args.format, num_chains=args.chains, max_tokens=args.max_tokens))

    start = time.perf_counter()
    verifier.verify(records)
    batch_s = time.perf_counter() - start
    batch_stats = llm.stats.as_dict()
    # Latency of one call per solution: the first call of each was made above, so its prompt is cached now.
    cached = []
    for rec in records:
        llm.reset_stats()
        t = time.perf_counter()
        verifier.verify([rec])
        cached.append((time.perf_counter() - t, llm.stats.prefill_tokens, llm.stats.cached_tokens))
    cold_llm = LLM(model, device=args.device, enable_prefix_caching=False)
    cold_verifier = Verifier(cold_llm, verifier.config)
    cold = []
    for rec in records:
        t = time.perf_counter()
        cold_verifier.verify([rec])
        cold.append(time.perf_counter() - t)
    chains = len(records) * args.chains
    print(f"{len(records)} solutions x K={args.chains} chains of <= {args.max_tokens} tokens on {args.device}")
    print(f"  batch: {batch_s:.3f} s, {chains / batch_s:.2f} chains/s, "
          f"{batch_stats['generated_tokens'] / batch_s:.1f} generated tok/s, prefilled "
          f"{batch_stats['prefill_tokens']} of {batch_stats['prompt_tokens']} prompt tokens")
    print(f"  one call, prompt cached:     median {statistics.median(c[0] for c in cached) * 1e3:.1f} ms "
          f"(prefilled {statistics.median(c[1] for c in cached):.0f} tokens, "
          f"{statistics.median(c[2] for c in cached):.0f} from cache)")
    print(f"  one call, no prefix caching: median {statistics.median(cold) * 1e3:.1f} ms")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    print(json.dumps(dict(
        bench="verify", device=device_name, threads=torch.get_num_threads(), commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=model,
        solutions=len(records), chains=args.chains, max_tokens=args.max_tokens, batch_s=round(batch_s, 4),
        chains_per_s=round(chains / batch_s, 3), cached_call_ms=round(statistics.median(c[0] for c in cached) * 1e3, 2),
        uncached_call_ms=round(statistics.median(cold) * 1e3, 2), batch_stats=batch_stats)))


if __name__ == "__main__":
    main()
