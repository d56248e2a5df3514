"""prmkern against transformers' generate on one prompt of P tokens and N sampled chains of G tokens each.

Both run in this process on the same checkpoint and dtype, one after the other, so their times are comparable on a
noisy machine. Prints both times and the ratio; the last stdout line is one JSON document.

  python benchmarks/bench_engine.py --prompt-len 512 --chains 16 --gen-len 64
  python benchmarks/bench_engine.py --smoke          # tiny sizes, for CI
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.tiny import build_checkpoint  # noqa: E402

# The reference shape: a Qwen2 config of ~39M parameters.
BENCH_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_transformers(path: str, dtype: torch.dtype, device: str, prompt: list[int], chains: int, gen: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                             num_return_sequences=chains, max_new_tokens=gen, min_new_tokens=gen,
                             pad_token_id=0, eos_token_id=None)
    elapsed = time.perf_counter() - start
    assert out.shape == (chains, len(prompt) + gen), out.shape
    return elapsed


def run_prmkern(path: str, dtype: torch.dtype, device: str, prompt: list[int], chains: int, gen: int,
                backend: str | None, enforce_eager: bool = False, repeat: int = 1,
                packed_gemm_bytes: int = 1 << 30) -> tuple[float, dict]:
    """Best of `repeat` timed runs (later runs hit the prefix cache for the prompt; the first one's stats are
    returned, and with repeat > 1 the time is the best run's, so graph capture and Triton compiles are excluded)."""
    llm = LLM(path, dtype=dtype, device=device, attention_backend=backend, max_num_batched_tokens=4096,
              enforce_eager=enforce_eager, packed_gemm_bytes=packed_gemm_bytes)
    params = SamplingParams(n=chains, temperature=1.0, max_tokens=gen, ignore_eos=True, seed=0)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up (first-call allocations)
    llm.reset_stats()
    times, stats = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        times.append(time.perf_counter() - start)
        assert len(out.outputs) == chains and all(len(c.token_ids) == gen for c in out.outputs)
        stats = stats or llm.stats.as_dict()
    return min(times), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="attention backend (default: triton on CUDA, torch elsewhere)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a ~39M Qwen2 built here)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to keep the script alive in CI")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both engines")
    ap.add_argument("--enforce-eager", action="store_true", help="prmkern without CUDA graphs")
    ap.add_argument("--repeat", type=int, default=1, help="prmkern timed runs; the best is reported")
    ap.add_argument("--packed-gemm-bytes", type=int, default=1 << 30,
                    help="CPU packed-weight budget (0: ordinary GEMMs, to see what packing brings)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.prompt_len, args.chains, args.gen_len = 40, 4, 8
    dtype = getattr(torch, args.dtype)
    tmp = None
    path = args.model
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = build_checkpoint(tmp.name, "qwen2", dtype=dtype, **(SMOKE_MODEL if args.smoke else BENCH_MODEL))
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    prompt = torch.randint(1, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    ours, stats = run_prmkern(path, dtype, args.device, prompt, args.chains, args.gen_len, args.backend,
                              args.enforce_eager, args.repeat, args.packed_gemm_bytes)
    theirs = None if args.skip_transformers else run_transformers(path, dtype, args.device, prompt, args.chains,
                                                                  args.gen_len)
    print(f"P={args.prompt_len} N={args.chains} G={args.gen_len} {args.dtype} on {args.device} "
          f"(torch threads {torch.get_num_threads()})")
    print(f"  prmkern:      {ours:8.3f} s   prefill tokens computed {stats['prefill_tokens']}")
    if theirs is not None:
        print(f"  transformers: {theirs:8.3f} s   generate(num_return_sequences={args.chains})")
        print(f"  speed-up:     {theirs / ours:8.2f}x")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    result = dict(bench="engine", device=device_name, commit=git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  prompt_len=args.prompt_len, chains=args.chains, gen_len=args.gen_len, dtype=args.dtype,
                  model=args.model or ("smoke" if args.smoke else "qwen2-39M-random"), prmkern_s=round(ours, 4),
                  transformers_s=None if theirs is None else round(theirs, 4),
                  speedup=None if theirs is None else round(theirs / ours, 3), threads=torch.get_num_threads(),
                  enforce_eager=args.enforce_eager, repeat=args.repeat, packed_gemm_bytes=args.packed_gemm_bytes,
                  stats=stats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
