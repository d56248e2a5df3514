"""One vLLM-style beam-search script run under vLLM and under prmkern on the same random checkpoint, and the two
answers compared (tokens, cum_logprob, text). Not a test: it needs vLLM's venv (scripts/setup_vllm_venv.sh) and
about five minutes of vLLM CPU start-up.

    python scripts/beam_search_vs_vllm.py --vllm-python /work/vllm-venv/bin/python [--workdir DIR]

Under the hood it re-runs itself as `--side vllm` (with vLLM's interpreter) and `--side prmkern`, each writing the
beams as JSON. vLLM's CPU attention needs a head dim of 32 or more: the checkpoint has 4 heads of 64.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPTS = [[5, 17, 230, 41, 99, 310, 7], [400, 12, 3, 77, 150]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's prmkern, not an installed one


def run_side(side: str, model: str, out: str) -> None:
    if side == "vllm":
        from vllm import LLM
        from vllm.sampling_params import BeamSearchParams
        llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, gpu_memory_utilization=0.1)
    else:
        sys.path.insert(0, ROOT)
        from prmkern import LLM
        from prmkern.sampling_params import BeamSearchParams
        llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, device="cpu")
    rows = []
    for length_penalty in (1.0, 0.0, 2.0):
        outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                               BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=length_penalty))
        rows += [[{"tokens": s.tokens, "cum_logprob": s.cum_logprob, "text": s.text} for s in o.sequences]
                 for o in outs]
    with open(out, "w") as f:
        json.dump(rows, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", help="interpreter of the vLLM venv")
    ap.add_argument("--workdir", default="/tmp/beam_search_vs_vllm")
    ap.add_argument("--side", choices=["vllm", "prmkern"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = os.path.join(args.workdir, "ck")
    if args.side:
        return run_side(args.side, model, os.path.join(args.workdir, f"{args.side}.json"))
    if not args.vllm_python:
        raise SystemExit("give --vllm-python PATH (the vLLM venv's interpreter)")
    sys.path.insert(0, ROOT)
    from prmkern.tiny import build_checkpoint
    if not os.path.isdir(model):
        build_checkpoint(model, "qwen2", seed=3, vocab_size=512, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    for side, python in (("vllm", args.vllm_python), ("prmkern", sys.executable)):
        subprocess.run([python, os.path.abspath(__file__), "--side", side, "--workdir", args.workdir], env=env,
                       check=True)
    a, b = (json.load(open(os.path.join(args.workdir, f"{s}.json"))) for s in ("vllm", "prmkern"))
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    same = len(a) == len(b) and all(len(ra) == len(rb) for ra, rb in zip(a, b)) and \
        all(x["tokens"] == y["tokens"] and x["text"] == y["text"] for x, y in pairs)
    worst = max(abs(x["cum_logprob"] - y["cum_logprob"]) for x, y in pairs)
    print(json.dumps({"beams": len(pairs), "tokens_and_text_equal": same, "max_abs_cum_logprob_diff": worst}))


if __name__ == "__main__":
    main()
