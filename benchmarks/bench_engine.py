"""prmkern against transformers' generate on one prompt of P tokens and N sampled chains of G tokens each.

Both run in this process on the same checkpoint and dtype, one after the other, so their times are comparable on a
noisy machine; with --pairs K they alternate K times, each pair on a new prompt, and the medians are reported. By
default each engine first runs the same shape once, untimed, on a prompt of its own (steady state: prmkern's
one-time costs, packing CPU weights for the batch or capturing CUDA graphs, are paid there; transformers gets the
same warm-up); --no-warmup times the first run. Prints both times and the ratio; the last stdout line is one JSON
document.

  python benchmarks/bench_engine.py --prompt-len 512 --chains 16 --gen-len 64
  python benchmarks/bench_engine.py --smoke          # tiny sizes, for CI
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
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


class Transformers:
    """transformers' generate(num_return_sequences=N) on the same checkpoint: the user's baseline."""

    def __init__(self, path: str, dtype: torch.dtype, device: str, chains: int, gen: int):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.chains, self.gen = device, chains, gen

    def __call__(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt], device=self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                      top_k=0, num_return_sequences=self.chains, max_new_tokens=self.gen,
                                      min_new_tokens=self.gen, pad_token_id=0, eos_token_id=None)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        assert out.shape == (self.chains, len(prompt) + self.gen), out.shape
        return elapsed


class Prmkern:
    """prmkern's LLM.generate with n=N: one engine for every run, so its prefix cache, packed CPU weights and CUDA
    graphs persist across runs as they would in a service (each timed run uses a new prompt: no cache hit)."""

    def __init__(self, path: str, dtype: torch.dtype, device: str, chains: int, gen: int, backend: str | None,
                 enforce_eager: bool, packed_gemm_bytes: int):
        self.llm = LLM(path, dtype=dtype, device=device, attention_backend=backend, max_num_batched_tokens=4096,
                       enforce_eager=enforce_eager, packed_gemm_bytes=packed_gemm_bytes)
        self.params = SamplingParams(n=chains, temperature=1.0, max_tokens=gen, ignore_eos=True, seed=0)
        self.llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # first-call allocations
        self.chains, self.gen = chains, gen

    def __call__(self, prompt: list[int]) -> tuple[float, dict]:
        self.llm.reset_stats()
        start = time.perf_counter()
        out = self.llm.generate([prompt], self.params)[0]
        elapsed = time.perf_counter() - start
        assert len(out.outputs) == self.chains and all(len(c.token_ids) == self.gen for c in out.outputs)
        return elapsed, self.llm.stats.as_dict()


def prompts_with_distinct_heads(count: int, length: int, vocab: int) -> list[list[int]]:
    """Random prompts whose first tokens all differ, so no prompt shares a cached block with another."""
    out = []
    for i in range(count):
        p = torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(i)).tolist()
        p[0] = 1 + i % (vocab - 1)
        out.append(p)
    return out


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
    ap.add_argument("--pairs", type=int, default=1,
                    help="timed runs per engine, interleaved, each on a new prompt; medians are reported")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first run of the shape (default: both engines run it once untimed on another "
                         "prompt first)")
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
    warm = 0 if args.no_warmup else 1
    prompts = prompts_with_distinct_heads(warm + args.pairs, args.prompt_len, vocab)
    ours = Prmkern(path, dtype, args.device, args.chains, args.gen_len, args.backend, args.enforce_eager,
                   args.packed_gemm_bytes)
    theirs = None if args.skip_transformers else Transformers(path, dtype, args.device, args.chains, args.gen_len)
    if warm:  # the same shape once, untimed, on a prompt of its own: one-time costs are paid here by both
        ours(prompts[0])
        if theirs is not None:
            theirs(prompts[0])
    ours_s, theirs_s, stats = [], [], None
    for p in prompts[warm:]:  # interleaved, so the machine's drift touches both alike
        t, st = ours(p)
        ours_s.append(t)
        stats = stats or st
        if theirs is not None:
            theirs_s.append(theirs(p))
    med = statistics.median
    ratios = [b / a for a, b in zip(ours_s, theirs_s)]
    print(f"P={args.prompt_len} N={args.chains} G={args.gen_len} {args.dtype} on {args.device} "
          f"(torch threads {torch.get_num_threads()}, {args.pairs} timed run(s) each, medians)")
    print(f"  prmkern:      {med(ours_s):8.3f} s   prefill tokens computed {stats['prefill_tokens']}")
    if theirs is not None:
        print(f"  transformers: {med(theirs_s):8.3f} s   generate(num_return_sequences={args.chains})")
        print(f"  speed-up:     {med(ratios):8.2f}x   (per run: {', '.join(f'{r:.2f}' for r in ratios)})")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    result = dict(bench="engine", device=device_name, commit=git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  prompt_len=args.prompt_len, chains=args.chains, gen_len=args.gen_len, dtype=args.dtype,
                  model=args.model or ("smoke" if args.smoke else "qwen2-39M-random"),
                  prmkern_s=round(med(ours_s), 4), transformers_s=round(med(theirs_s), 4) if theirs_s else None,
                  speedup=round(med(ratios), 3) if ratios else None, prmkern_runs_s=[round(t, 4) for t in ours_s],
                  transformers_runs_s=[round(t, 4) for t in theirs_s], threads=torch.get_num_threads(),
                  enforce_eager=args.enforce_eager, packed_gemm_bytes=args.packed_gemm_bytes,
                  warmup="none" if args.no_warmup else "same shape, another prompt, both engines",
                  stats=stats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
