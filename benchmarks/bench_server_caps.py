"""Other clients' latency while one client sends the largest request the server's caps allow (issue 24).

On loopback, with a random-weight Qwen2 built like the tests' (tests/conftest.py's tiny config): a "small" client
sends 8-token completions and GETs /health back to back; meanwhile a "big" client sends requests at the caps
(prompt_logprobs = --max-logprobs over a long prompt; logprob_token_ids of --max-token-ids ids with n = 8). The
same small client runs alone first (the baseline). Bounded: --seconds of load, two clients. The last stdout line is
one JSON document with the CPU model, commit, date and the figures (ms, p50 / p90 / max).

    PYTHONPATH=. python benchmarks/bench_server_caps.py --seconds 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else float("nan")


def small_client(url: str, stop: threading.Event, out: dict[str, list[float]]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0,
                                            "ignore_eos": True}).raise_for_status()
            out["completion"].append(time.perf_counter() - t)
            t = time.perf_counter()
            c.get("/health").raise_for_status()
            out["health"].append(time.perf_counter() - t)


def big_client(url: str, stop: threading.Event, done: list[int], max_model_len: int) -> None:
    long_prompt = [(i * 7) % 500 + 3 for i in range(max_model_len - 80)]
    bodies = [{"prompt": long_prompt, "max_tokens": 1, "prompt_logprobs": 20},
              {"prompt": [1, 2, 3], "n": 8, "max_tokens": 64, "ignore_eos": True,
               "logprob_token_ids": list(range(256))}]
    with httpx.Client(base_url=url, timeout=300) as c:
        i = 0
        while not stop.is_set():
            r = c.post("/v1/completions", json=bodies[i % 2])
            assert r.status_code == 200, r.text[:300]
            done.append(len(r.content))
            i += 1


def measure(url: str, seconds: float, with_big: bool, max_model_len: int) -> dict:
    stop, out, done = threading.Event(), {"completion": [], "health": []}, []
    threads = [threading.Thread(target=small_client, args=(url, stop, out))]
    if with_big:
        threads.append(threading.Thread(target=big_client, args=(url, stop, done, max_model_len)))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(300)
    return {k: {"n": len(v), "p50_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9), "max_ms": pct(v, 1.0)}
            for k, v in out.items()} | ({"big_requests": len(done), "big_bytes_max": max(done, default=0)}
                                        if with_big else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    from prmkern import LLM
    from prmkern.serve.app import ServerConfig, build_app
    from prmkern.serve.background import serve_in_thread
    from prmkern.tiny import build_checkpoint
    tmp = tempfile.mkdtemp(prefix="bench-caps-")  # the tests' tiny random-weight Qwen2 (tests/conftest.py)
    llm = LLM(build_checkpoint(tmp, "qwen2", seed=0, vocab_size=509, intermediate_size=197), device="cpu")
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny"))) as url:
        base = measure(url, args.seconds, False, llm.engine.max_model_len)
        loaded = measure(url, args.seconds, True, llm.engine.max_model_len)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "server_caps", "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                      "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "seconds": args.seconds, "alone": base, "during_capped_requests": loaded}))


if __name__ == "__main__":
    main()
