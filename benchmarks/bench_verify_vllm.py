"""A verification job on prmkern against the released ThinkPRM protocol on vLLM's CPU build, side by side.

The same random-weight Qwen2 (~23M parameters, with the tiny byte-level tokenizer: prmkern.tiny.build_checkpoint),
the same ProcessBench solutions (the bundled sample), the ThinkPRM prompt and stop strings, K chains and max tokens,
T=0.4 (ThinkPRM's parallel scaling; its T=0 default is one chain, and vLLM refuses greedy n > 1):

* prmkern, batch-synchronous: `cli.verify.verify_rows` over groups of 64 // K records (each group waits for its
  slowest chain), as `prmkern verify` ran before continuous batching;
* prmkern, continuous: `cli.verify.verify_continuous` over all records (what `prmkern verify` runs now);
  both with `VerifyConfig(format="thinkprm", scoring="exact")`: K chains per solution from one prefill, then the
  forced final verdict (one position per chain, P(yes) read from exact log-probabilities);
* vLLM: benchmarks/vllm_verify_peer.py in the vLLM venv: n=K with the stop strings, then the forced verdict as a
  second request per chain with logprobs=20, prefix caching on.

The engines alternate, `--reps` times, in one run (vLLM in its own process, waited idle before each prmkern run).
Prints chains/s and generated tokens/s per run; the last stdout line is one JSON document. Sampling differs between
the engines (vLLM's CPU build takes no per-request seeds), so their generated token counts differ a little; the
figure compared is generated tokens per second.

  python benchmarks/bench_verify_vllm.py --vllm-python /work/vllm-venv/bin/python [--reps 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import VllmPeer, git_commit  # noqa: E402
from benchmarks.roofline import cpu_model  # noqa: E402
from prmkern import LLM  # noqa: E402
from prmkern.cli.jobs import Item  # noqa: E402
from prmkern.cli.verify import verify_continuous, verify_rows  # noqa: E402
from prmkern.tiny import build_checkpoint  # noqa: E402
from prmkern.verify.processbench import sample_path  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402

# ~23.6M parameters: 8 layers of 2.8M (hidden 512, 8 query and 2 KV heads, MLP 1408) and a tied 2048 x 512 embedding
MODEL = dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def checkpoint() -> str:
    root = os.environ.get("PRMKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prmkern"))
    path = os.path.join(root, "bench", "verify-qwen2-23m")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        build_checkpoint(path, "qwen2", **MODEL)
    return path


class VerifyPeer(VllmPeer):
    """vllm_verify_peer.py kept alive; VllmPeer's reading, CPU accounting and idle wait."""

    def __init__(self, python: str, path: str, threads: int):  # noqa: D107 - VllmPeer's start, another script
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_verify_peer.py")
        self.proc = subprocess.Popen([python, script, "--model", path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def job(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()


def run_prmkern(llm: LLM, config: VerifyConfig, items: list[Item], continuous: bool) -> dict:
    verifier = Verifier(llm, config)
    size = max(1, 64 // config.num_chains)
    rows: dict[int, dict] = {}
    emit = rows.__setitem__
    llm.reset_stats()
    start = time.perf_counter()
    if continuous:
        chains = verify_continuous(verifier, items, emit, llm.tokenizer, True, size)
    else:
        chains = 0
        for g in range(0, len(items), size):
            chains += verify_rows(verifier, items[g:g + size], emit, llm.tokenizer, True, size)
    seconds = time.perf_counter() - start
    st = llm.stats.as_dict()
    assert len(rows) == len(items) and not any(r.get("error") for r in rows.values()), rows
    return {"seconds": round(seconds, 3), "chains": chains, "chains_per_s": round(chains / seconds, 3),
            "generated_tokens": st["generated_tokens"],
            "generated_tokens_per_s": round(st["generated_tokens"] / seconds, 1),
            "decode_steps": st.get("decode_steps"),
            "tokens_per_decode_step": round(st["generated_tokens"] / max(1, st.get("decode_steps") or 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=None, help="the vLLM venv's interpreter; without it prmkern only")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.4, help="ThinkPRM's parallel-scaling T (n=4 at 0.4)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = checkpoint()
    with open(sample_path()) as f:
        records = [json.loads(line) for line in f][:args.limit]
    items = [Item(i, i + 1, rec) for i, rec in enumerate(records)]
    llm = LLM(path, device="cpu", dtype="float32")
    config = VerifyConfig(format="thinkprm", num_chains=args.chains, max_tokens=args.max_tokens, scoring="exact",
                          temperature=args.temperature, seed=0)
    v = Verifier(llm, config)
    prompts, stops = [], []
    for rec in records:
        problem, steps = v.prepare(rec)
        text = v.fmt.render(problem, steps, llm.tokenizer)
        prompts.append(text)
        stops.append(list(v.stops(text, len(steps))))
    job = {"prompts": prompts, "stops": stops, "chains": args.chains, "max_tokens": args.max_tokens,
           "temperature": config.temperature, "top_p": config.top_p, "final_prefix": v.fmt.final_prefix,
           "labels": list(v.fmt.final_labels)}
    peer = VerifyPeer(args.vllm_python, path, args.threads) if args.vllm_python else None
    warm = items[:2]
    run_prmkern(llm, config, warm, True)  # untimed: first-touch allocations, lazy compilation
    if peer:
        peer.job(dict(job, prompts=prompts[:2], stops=stops[:2]))
    runs: list[dict] = []
    for rep in range(args.reps):
        for side in (["vllm"] if peer else []) + ["batch", "continuous"]:
            if peer:
                peer.wait_idle()
            load = os.getloadavg()[0]
            if side == "vllm":
                r = peer.job(job)
                r = {"seconds": round(r["seconds"], 3), "chains": r["chains"],
                     "chains_per_s": round(r["chains"] / r["seconds"], 3), "generated_tokens": r["generated_tokens"],
                     "generated_tokens_per_s": round(r["generated_tokens"] / r["seconds"], 1),
                     "chain_seconds": round(r["chain_seconds"], 3), "verdict_seconds": round(r["verdict_seconds"], 3),
                     "p_yes_read": r["p_yes_read"]}
            else:
                r = run_prmkern(llm, config, items, side == "continuous")
            r.update(engine=side, rep=rep, load_avg_1m=round(load, 2))
            runs.append(r)
            print(f"{side:>10} #{rep}: {r['seconds']:.2f} s, {r['chains_per_s']:.2f} chains/s, "
                  f"{r['generated_tokens_per_s']:.1f} generated tokens/s ({r['generated_tokens']} tokens), "
                  f"load {load:.2f}", flush=True)
    if peer:
        peer.close()
    ratios = {}
    for rep in range(args.reps):
        by = {r["engine"]: r for r in runs if r["rep"] == rep}
        for a, b in (("continuous", "batch"), ("continuous", "vllm"), ("batch", "vllm")):
            if a in by and b in by:
                ratios.setdefault(f"{a}/{b}", []).append(
                    round(by[a]["generated_tokens_per_s"] / by[b]["generated_tokens_per_s"], 3))
    for k, vals in ratios.items():
        print(f"generated tokens/s {k}: {vals}")
    result = {"bench": "verify_vs_vllm", "cpu_model": cpu_model(), "machine": platform.machine(),
              "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": "qwen2-23.6M-random",
              "solutions": len(records), "chains": args.chains, "max_tokens": args.max_tokens,
              "threads": args.threads, "format": "thinkprm", "scoring": "exact", "runs": runs,
              "ratios_generated_tokens_per_s": ratios}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
