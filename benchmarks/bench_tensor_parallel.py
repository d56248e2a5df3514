"""Tensor parallelism: one engine on one device (TP=1) against the same model split over T ranks (TP=T).

One prompt of P tokens and N sampled chains of G tokens (the verifier's shape: one prompt prefilled once, its KV
shared by the chains), on the same checkpoint and dtype, both engines alive in this process and timed alternately
(--pairs K: K prompts, medians), after one untimed warm-up run each. Reports the times, the ratio and whether the
two produced the same tokens (same seeds; fp32 rounding of the all-reduce may flip a rare near-tie). On the CPU the
ranks share the machine's cores (gloo, torch threads split between ranks), so this measures the overhead of the
split and the step broadcast, not a speed-up: TP exists for models that do not fit one device. GPU figures (NCCL)
are not measured here. The last stdout line is one JSON document.

  python benchmarks/bench_tensor_parallel.py --tensor-parallel-size 2
  python benchmarks/bench_tensor_parallel.py --smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.tiny import build_checkpoint  # noqa: E402

from benchmarks.bench_engine import BENCH_MODEL, SMOKE_MODEL, emit_result, git_commit  # noqa: E402  (one model, one stamp)
from benchmarks.roofline import cpu_model  # noqa: E402


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return time.perf_counter() - start, [c.token_ids for c in out.outputs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensor-parallel-size", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a ~39M Qwen2 built here)")
    ap.add_argument("--pairs", type=int, default=3, help="timed runs of each engine, alternating")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to keep the script alive in CI")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = ap.parse_args()
    if args.smoke:
        args.prompt_len, args.chains, args.gen_len, args.pairs = 40, 4, 8, 1
    dtype = getattr(torch, args.dtype)
    tmp = None
    path = args.model
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = build_checkpoint(tmp.name, "qwen2", dtype=dtype, tokenizer=False,
                                **(SMOKE_MODEL if args.smoke else BENCH_MODEL))
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.pairs + 1)]
    params = SamplingParams(n=args.chains, temperature=1.0, max_tokens=args.gen_len, ignore_eos=True, seed=0)
    kw = dict(dtype=dtype, device=args.device, max_num_batched_tokens=4096)
    start = time.perf_counter()
    one = LLM(path, **kw)
    start_one = time.perf_counter() - start
    start = time.perf_counter()
    tp = LLM(path, tensor_parallel_size=args.tensor_parallel_size, **kw)
    start_tp = time.perf_counter() - start
    try:
        timed(one, prompts[0], params)  # warm-up: first-call allocations, packed weights
        timed(tp, prompts[0], params)
        one_s, tp_s, same = [], [], []
        for p in prompts[1:]:
            t1, a = timed(one, p, params)
            t2, b = timed(tp, p, params)
            one_s.append(t1)
            tp_s.append(t2)
            same.append(a == b)
    finally:
        tp.close()
    med = statistics.median
    tokens = args.chains * args.gen_len
    t = args.tensor_parallel_size
    print(f"P={args.prompt_len} N={args.chains} G={args.gen_len} {args.dtype} on {args.device}, TP=1 vs TP={t} "
          f"({args.pairs} alternating run(s), medians)")
    print(f"  TP=1: {med(one_s):8.3f} s  {tokens / med(one_s):8.1f} generated tok/s   (engine start {start_one:.1f} s)")
    print(f"  TP={t}: {med(tp_s):8.3f} s  {tokens / med(tp_s):8.1f} generated tok/s   (engine start {start_tp:.1f} s)")
    print(f"  TP={t} / TP=1 time: {med(tp_s) / med(one_s):.2f}x; same tokens in {sum(same)} of {len(same)} runs")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    result = dict(bench="tensor_parallel", device=device_name, cpus=os.cpu_count(), commit=git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  tensor_parallel_size=t, prompt_len=args.prompt_len, chains=args.chains, gen_len=args.gen_len,
                  dtype=args.dtype, model=args.model or ("smoke" if args.smoke else "qwen2-39M-random"),
                  tp1_s=round(med(one_s), 4), tp_s=round(med(tp_s), 4), ratio=round(med(tp_s) / med(one_s), 3),
                  tp1_runs_s=[round(x, 4) for x in one_s], tp_runs_s=[round(x, 4) for x in tp_s],
                  same_tokens=same, start_tp1_s=round(start_one, 2), start_tp_s=round(start_tp, 2),
                  threads=torch.get_num_threads())
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
