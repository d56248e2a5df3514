"""The per-step floor of a decode step on this machine, for `bench_engine.py --roofline`.

floor = max(bytes read / measured read bandwidth, FLOPs / measured GEMM rate), where a decode step of `rows`
chains reads every projection weight once (the LM head once even when tied) plus the KV it attends (each group's
shared prefix once, each chain's own tokens), and does 2 FLOPs per weight per row plus 4 * head_dim FLOPs per
(query head, key) pair. Bandwidth: a threaded sum over a buffer far larger than the caches (best of several);
GEMM rate: a 1024^3 fp32 matmul (best of several), and for bf16 models the better of that and a bf16 one
(gemm_gflops). Both use torch's current thread count.
"""
from __future__ import annotations

import time

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu prints it), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth_gbs(mib: int = 512, repeats: int = 7) -> float:
    x = torch.ones(mib * 1024 * 1024 // 4)
    return x.numel() * 4 / _best(lambda: x.sum(), repeats) / 1e9


def sgemm_gflops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / _best(lambda: torch.mm(a, b), repeats) / 1e9


def gemm_gflops(dtype: torch.dtype, sgemm: float | None = None) -> float:
    """The compute rate a `dtype` model's GEMMs can reach here: the fp32 sgemm rate, or for bf16 the better of that
    and a bf16 matmul's (oneDNN on AVX-512 BF16 CPUs does two bf16 products per fp32 lane, as the C++ decode GEMM
    does; without them bf16 is widened to fp32). fp16 weights are widened to fp32: the fp32 rate."""
    fp32 = sgemm if sgemm is not None else sgemm_gflops()
    return max(fp32, sgemm_gflops(dtype=torch.bfloat16)) if dtype == torch.bfloat16 else fp32


def decode_step_floor(spec, dtype: torch.dtype, rows: int, prefix_len: int, mean_suffix_len: float,
                      bandwidth_gbs: float, gflops: float) -> dict:
    """The floor of one decode step of `rows` chains sharing a `prefix_len`-token prefix, each with
    `mean_suffix_len` tokens of its own; spec: the model's DecoderSpec."""
    h, i, v, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
    weights = L * per_layer + v * h  # LM head (embedding rows read are negligible)
    esize = torch.finfo(dtype).bits // 8
    kv_tokens = prefix_len + rows * mean_suffix_len
    bytes_read = weights * esize + 2 * L * kv * esize * kv_tokens
    flops = 2 * rows * weights + 4 * L * spec.num_heads * spec.head_dim * rows * (prefix_len + mean_suffix_len)
    t_bw, t_fl = bytes_read / (bandwidth_gbs * 1e9), flops / (gflops * 1e9)
    return dict(bytes=int(bytes_read), flops=int(flops), bandwidth_s=t_bw, compute_s=t_fl, floor_s=max(t_bw, t_fl),
                bound="bandwidth" if t_bw >= t_fl else "compute")


def generation_floor(spec, dtype: torch.dtype, prompt_len: int, chains: int, gen_len: int, bandwidth_gbs: float,
                     gflops: float) -> dict:
    """The floor of a whole verification run: one prefill of the `prompt_len`-token prompt (every projection weight
    x every prompt token, causal attention, the LM head for its last token) at the GEMM rate, then `gen_len - 1`
    decode steps of `chains` rows (the first token of every chain is drawn from the prefill's logits), each at
    decode_step_floor. No engine can run it faster on this machine: `peer seconds / floor_s` bounds any speed-up
    over a peer (with prompt caching; the peer's own waste is not subtracted)."""
    h, i, v, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
    prefill_flops = (2 * prompt_len * L * per_layer + 2 * v * h
                     + 4 * L * spec.num_heads * spec.head_dim * prompt_len * (prompt_len + 1) / 2)
    prefill_s = prefill_flops / (gflops * 1e9)
    # Whole 16-token blocks of the prompt are shared; its last partial block is each chain's own (as bench_engine's
    # per-step floor counts it).
    shared, own = prompt_len // 16 * 16, prompt_len % 16
    steps = [decode_step_floor(spec, dtype, chains, shared, own + s, bandwidth_gbs, gflops) for s in range(1, gen_len)]
    decode_s = sum(st["floor_s"] for st in steps)
    return dict(prefill_flops=int(prefill_flops), prefill_s=prefill_s, decode_steps=len(steps), decode_s=decode_s,
                floor_s=prefill_s + decode_s)
