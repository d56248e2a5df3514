"""vLLM's CPU engine as a benchmark peer, run by `bench_engine.py --peer vllm` under the vLLM venv's interpreter
(scripts/setup_vllm_venv.sh). It loads the checkpoint once, then serves timed runs over stdin/stdout, one JSON
line each way, so bench_engine can alternate it with prmkern:

  in:  {"prompt": [token ids]}        out: {"seconds": t, "prompt_tokens_computed": n, "generated_tokens": g}

`prompt_tokens_computed` is vLLM's own count of prompt tokens it ran through the model in that run (its prompt
token counter minus its prefix-cache hits, from LLM.get_metrics()); null when this vLLM does not expose them.
Runs only from the benchmark, never from the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for m in llm.get_metrics():
            value = getattr(m, "value", None)
            if isinstance(value, (int, float)):
                out[m.name] = out.get(m.name, 0.0) + float(value)
    except Exception:  # an older vLLM without get_metrics / without stats logging
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chains", type=int, required=True)
    ap.add_argument("--gen-len", type=int, required=True)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="vLLM without torch.compile: its CPU build's compile of a 1.5B model did not finish in 18 "
                         "minutes on a 2-core AVX2 machine")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enable_prefix_caching=True,
              skip_tokenizer_init=True, disable_log_stats=False, seed=0, enforce_eager=args.enforce_eager)
    params = SamplingParams(n=args.chains, temperature=1.0, top_k=-1, max_tokens=args.gen_len,
                            min_tokens=args.gen_len, ignore_eos=True, detokenize=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        before = _counters(llm)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": req["prompt"]}], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        after = _counters(llm)

        def delta(name: str) -> float | None:
            return after[name] - before.get(name, 0.0) if name in after else None

        prompt = delta("vllm:prompt_tokens")
        hits = delta("vllm:prefix_cache_hits")
        computed = None if prompt is None else int(prompt - (hits or 0))
        generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
        print(json.dumps({"seconds": elapsed, "prompt_tokens_computed": computed, "generated_tokens": generated,
                          "vllm_prompt_tokens": prompt, "vllm_prefix_cache_hits": hits}), flush=True)


if __name__ == "__main__":
    main()
