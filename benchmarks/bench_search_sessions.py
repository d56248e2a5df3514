"""Search with the verifier in the loop: verification sessions against re-verifying every partial solution.

Runs step-level beam search and best-of-N over MATH-500 problems (default: ../shared/data/math500/test.jsonl, the
first --problems) with the shipped verifier (prmkern/data/verifier, its own `prmkern` format), once re-verifying
each partial solution from its first step (today's `verifier.verify`) and once on sessions (fork + add_step;
best-of-N with pruning). The shipped checkpoint cannot write MATH solutions (it answers "Is the solution correct?
No"), so the candidates come from `ReplayGenerator`: the reference solution's paragraphs, sample 0 verbatim and
sample j > 0 with one digit changed, which gives the verifier real multi-step MATH text to judge. Verification is
greedy by default so both runs can agree; the JSON reports whether they chose the same candidates and, per run,
the verifier's prompt tokens, tokens prefilled, tokens generated, verifier seconds and total seconds.

    python benchmarks/bench_search_sessions.py --problems 8 --threads 2 --out benchmarks/results/search_sessions_cpu.json

The last stdout line is one JSON document.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402
from prmkern.verify.search import beam_search, best_of_n  # noqa: E402

VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")
MATH500 = os.path.join(ROOT, "..", "shared", "data", "math500", "test.jsonl")


class Timed:
    """An LLM whose generate()/reward() time is summed (the verifier's share of a search)."""

    def __init__(self, llm: LLM):
        self._llm, self.seconds = llm, 0.0

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._llm.generate(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t


class ReplayGenerator:
    """A stand-in generator over MATH-500 reference solutions (see the module docstring). Sample j of a step is the
    reference paragraph with its last digit shifted by j (sample 0 unchanged)."""

    def __init__(self, tokenizer, problems: list[dict], max_steps: int):
        from prmkern.outputs import CompletionOutput, RequestOutput
        from prmkern.verify.search import solver_prompt, split_steps
        self.tokenizer, self._co, self._ro = tokenizer, CompletionOutput, RequestOutput
        self.prompts = [(solver_prompt(tokenizer, p["problem"]), split_steps(p["solution"])[:max_steps])
                        for p in problems]

    @staticmethod
    def perturb(text: str, j: int) -> str:
        if j == 0:
            return text
        for i in range(len(text) - 1, -1, -1):
            if text[i].isdigit():
                return text[:i] + str((int(text[i]) + j) % 10) + text[i + 1:]
        return text + f" (that is {j})"

    def _paragraphs(self, prompt: list[int]) -> tuple[list[str], int]:
        for base, paras in self.prompts:
            if prompt[:len(base)] == base:
                done = self.tokenizer.decode(prompt[len(base):]).count("\n\n")
                return paras, done
        raise ValueError("unknown prompt")

    def generate(self, prompts, params, use_tqdm=False):
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for r, (prompt, sp) in enumerate(zip(prompts, params)):
            paras, done = self._paragraphs(prompt)
            beam = sp.stop is not None  # beam search asks for one step (stop at the blank line)
            choices = []
            for j in range(sp.n):
                if beam:
                    last = done + 1 >= len(paras)
                    text = self.perturb(paras[min(done, len(paras) - 1)], j) + ("" if last else "\n\n")
                else:
                    k = (j - 1) % len(paras)
                    text = "\n\n".join(self.perturb(x, j if i == k else 0) for i, x in enumerate(paras))
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                stop = "\n\n" if beam and text.endswith("\n\n") else None
                choices.append(self._co(j, text, ids, finish_reason="stop", stop_reason=stop))
            outs.append(self._ro(str(r), None, list(prompt), choices))
        return outs


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def fixed_output_runner(items):
    """GenPRM's code rounds without a sandbox: every snippet 'prints' nothing (deterministic, free)."""
    from types import SimpleNamespace
    return [SimpleNamespace(status="ok", stdout="", stderr="") for _ in items]


def run(mode: str, fmt: str, problems: list[dict], args) -> dict:
    sessions = mode == "sessions"
    vllm = Timed(LLM(VERIFIER, device="cpu", dtype="float32", seed=0))
    gen = ReplayGenerator(vllm.tokenizer, problems, args.max_steps)
    if fmt == "genprm":
        config = VerifyConfig(format="genprm", scoring="exact", num_chains=args.chains,
                              temperature=args.verify_temperature,
                              max_tokens=args.genprm_max_tokens, method="min", max_code_rounds=1,
                              code_runner=fixed_output_runner)
    else:
        config = VerifyConfig(format=fmt, num_chains=args.chains, temperature=args.verify_temperature,
                              max_tokens=args.verify_max_tokens, method="min")
    verifier = Verifier(vllm, config)
    t0 = time.perf_counter()
    beams = [beam_search(gen, verifier, p["problem"], beam_width=args.beam_width, expand=args.expand,
                         max_steps=args.max_steps, step_tokens=args.step_tokens, seed=0, sessions=sessions)
             for p in problems]
    beam_s, beam_v = time.perf_counter() - t0, vllm.seconds
    beam_stats = vars(vllm.stats).copy()
    vllm.reset_stats()
    vllm.seconds = 0.0
    t0 = time.perf_counter()
    bon = best_of_n(gen, verifier, problems, n=args.n, select="score", sessions=sessions, prune=sessions,
                    params=SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.gen_max_tokens, seed=0))
    bon_s = time.perf_counter() - t0
    keys = ("prompt_tokens", "prefill_tokens", "cached_tokens", "generated_tokens")
    return {
        "beam": {"seconds": round(beam_s, 3), "verifier_seconds": round(beam_v, 3),
                 **{k: beam_stats[k] for k in keys},
                 "chosen": [[r.chosen.text if r.chosen else None, r.chosen.score if r.chosen else None]
                            for r in beams],
                 "candidates": sum(len(r.candidates) for r in beams)},
        "bon": {"seconds": round(bon_s, 3), "verifier_seconds": round(vllm.seconds, 3),
                **{k: getattr(vllm.stats, k) for k in keys},
                "chosen": [[r.chosen.text if r.chosen else None, r.chosen.score if r.chosen else None]
                           for r in bon]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=MATH500)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=400, help="problem + reference solution, at most (characters)")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4, help="reference paragraphs used per problem")
    ap.add_argument("--step-tokens", type=int, default=48, help="(unused by the replay generator)")
    ap.add_argument("--n", type=int, default=4, help="best-of-N candidates per problem")
    ap.add_argument("--gen-max-tokens", type=int, default=128)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--verify-temperature", type=float, default=0.0)
    ap.add_argument("--verify-max-tokens", type=int, default=256, help="per chain (per-step formats)")
    ap.add_argument("--genprm-max-tokens", type=int, default=48, help="per paragraph turn (genprm)")
    ap.add_argument("--formats", default="prmkern,genprm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.data) as f:  # the first problems whose reference fits the shipped verifier's 1,024 tokens
        problems = [p for p in map(json.loads, f) if len(p["solution"]) + len(p["problem"]) <= args.max_chars]
    problems = problems[:args.problems]
    runs = {f"{fmt}/{mode}": run(mode, fmt, problems, args) for fmt in args.formats.split(",")
            for mode in ("reverify", "sessions")}
    same = {f"{fmt}/{what}": f"{sum(a == b for a, b in zip(runs[fmt + '/reverify'][what]['chosen'], runs[fmt + '/sessions'][what]['chosen']))}/{len(problems)}"
            for fmt in args.formats.split(",") for what in ("beam", "bon")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    doc = {"benchmark": "search_sessions", "device": "cpu", "cpu": cpu_model(), "threads": args.threads,
           "commit": commit, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "args": vars(args), "runs": runs,
           "same_choice": same}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps({k: doc[k] for k in ("cpu", "commit", "same_choice")} | {
        m: {w: {k: runs[m][w][k] for k in ("seconds", "verifier_seconds", "prompt_tokens", "prefill_tokens",
                                           "generated_tokens")} for w in ("beam", "bon")} for m in runs}))


if __name__ == "__main__":
    main()
