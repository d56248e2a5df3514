"""The released ThinkPRM protocol on vLLM's CPU build, as its users run it: a benchmark peer for
bench_verify_vllm.py, run under the vLLM venv's interpreter (it does not import prmkern).

Per job (one JSON line on stdin; one JSON line back): every solution's prompt text goes in one `llm.generate` call
with `SamplingParams(n=K, temperature, top_p, max_tokens, stop=<the solution's stop strings>)` (prefix caching on,
so the K chains share the prompt's cached blocks); then, for every chain, the prompt + the chain's text + the forced
final question ("\\nIs the solution correct? ") goes in a second call with `max_tokens=1, logprobs=20`, and P(yes) is
read from the returned log-probabilities (thinkprm_api.py's released forced verdict, read from logprobs as a vLLM
user does instead of SGLang's select). Chains that stopped at "Is the solution correct?" have it cut by vLLM
(stop strings are not in the output), so the question is appended to every chain alike.

  in:  {"prompts": [text], "stops": [[str]], "chains": K, "max_tokens": M, "temperature": T, "top_p": P,
        "final_prefix": str, "labels": [yes, no]}
  out: {"seconds": s, "chain_seconds": s1, "verdict_seconds": s2, "generated_tokens": g, "chains": n,
        "p_yes_read": count of chains whose P(yes) was read}

vLLM's CPU build rejects per-request seeds: the engine seed is fixed at start. Runs only from the benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enable_prefix_caching=True,
              seed=0)
    tok = llm.get_tokenizer()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        params = [SamplingParams(n=job["chains"], temperature=job["temperature"], top_p=job["top_p"],
                                 max_tokens=job["max_tokens"], stop=stops) for stops in job["stops"]]
        outs = llm.generate(job["prompts"], params, use_tqdm=False)
        mid = time.perf_counter()
        forced = [p + c.text + job["final_prefix"] for p, o in zip(job["prompts"], outs) for c in o.outputs]
        verdicts = llm.generate(forced, SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=20),
                                use_tqdm=False)
        end = time.perf_counter()
        yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in job["labels"])
        read = 0
        for v in verdicts:
            lps = v.outputs[0].logprobs[0] if v.outputs[0].logprobs else {}
            if yes in lps and no in lps:  # P(yes) / (P(yes) + P(no)) from the top-20 list, as users read it
                py, pn = math.exp(lps[yes].logprob), math.exp(lps[no].logprob)
                read += py + pn > 0
        generated = sum(len(c.token_ids) for o in outs for c in o.outputs) + len(verdicts)
        print(json.dumps({"seconds": end - start, "chain_seconds": mid - start, "verdict_seconds": end - mid,
                          "generated_tokens": generated, "chains": len(forced), "p_yes_read": read}), flush=True)


if __name__ == "__main__":
    main()
