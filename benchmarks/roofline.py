"""Physical floors for `bench_engine.py --roofline`: measured ceilings of this machine, and the work a step must do.

Ceilings (each recorded with the CPU model and the instruction sets it was measured with):
- compute: csrc/peak.cpp's micro-kernels, 12 independent FMA chains per thread in registers, so their rate is the
  FMA ports' throughput: fp32 FMA at each level the CPU has (AVX2 FMA3, AVX-512F), and `vdpbf16ps` where it has
  AVX-512 BF16. Measured on one thread x the threads used and on all the threads at once, by the wall clock and
  by the threads' CPU time; the highest is the peak (a floor must be unbeatable: a busy neighbour on a shared
  machine can only lower a measurement, and the CPU time is what it cannot stretch). The peak of a dtype is
  the best instruction that dtype's products can use: fp32 and fp16 (widened) -> the fp32 FMA peak, bf16 -> the
  better of that, the bf16 dot peak and, on a CPU with AMX-BF16 (Intel), the AMX rate: prmkern has no AMX kernel,
  but a peer's oneDNN multiplies bf16 on AMX tiles there, so its floor must count them. That rate is torch's bf16
  matmul (oneDNN, on AMX there) at 2048^3, the best of 5 at the threads used (`amx_bf16_torch`): a rate reached,
  so a lower bound of the AMX peak, the best available without an AMX micro-kernel. Likewise fp16 on a CPU with
  AVX512-FP16 or AMX-FP16 (`fp16_torch`: torch's fp16 matmul, which oneDNN runs on them there), so a peer's native
  fp16 products cannot beat the fp16 floor either.
- read bandwidth: the best of several methods (csrc's AVX2 sweep over the threads, and on one thread also timed by
  its CPU time; torch's sum) over a buffer the size of the step's working set (capped at 512 MiB), so a working
  set that fits the caches gets the caches' rate.

Work (prmkern's way: the shared prefix read once per group, the LM head once, only the last prompt row's logits):
`prefill_counts` / `decode_step_counts` give FLOPs and bytes; a floor is max(bytes / bandwidth, FLOPs / peak).
Without prmkern._C the compute ceiling falls back to torch's matmul rate, which is not a physical peak (said so
in the result's `compute_method`).
"""
from __future__ import annotations

import time

import torch

PEAK_KINDS = ("fma_avx2", "fma_avx512", "bf16_dot")  # csrc/peak.cpp's micro-kernels
BF16_ONLY_KINDS = ("bf16_dot", "amx_bf16_torch")  # peaks only bf16 products reach
FP16_ONLY_KINDS = ("fp16_torch",)  # peaks only fp16 products reach
LIBRARY_KINDS = ("amx_bf16_torch", "fp16_torch")  # torch's matmul rates, measured only where the CPU has them


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


def isa_flags() -> dict:
    """The vector instruction sets /proc/cpuinfo lists that matter to the floors (empty off Linux)."""
    names = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {n: n in flags for n in names}


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ops():
    """prmkern._C when it is built with the micro-kernels (csrc/peak.cpp), else None."""
    from prmkern.ops.cpp import cpp_ops
    ops = cpp_ops()
    return ops if ops is not None and hasattr(ops, "peak_gflops") else None


def peak_gflops(threads: int, repeats: int = 9, seconds: float = 0.02) -> dict:
    """{kind: GFLOP/s} of each instruction kind this CPU runs (PRMKERN_ISA caps it) at `threads` threads, the most
    of: threads x one thread's rate, and all threads together, each timed by the wall clock and by the threads' own
    CPU time (a neighbour taking a core away stretches the first, not the second); plus `per_core`. Empty without
    prmkern._C."""
    ops = _ops()
    if ops is None:
        return {}
    out: dict = {"per_core": {}}
    for kind in PEAK_KINDS:
        probe = max(ops.peak_gflops(kind, 1, 10000, 1))
        if probe <= 0:
            continue
        # iterations for ~`seconds` per run: 12 instructions per iteration, probe tells their rate
        flops_per_iter = 12 * (64 if kind == "bf16_dot" else 32 if kind == "fma_avx512" else 16)
        iters = max(1000, int(seconds * probe * 1e9 / flops_per_iter))
        one = max(ops.peak_gflops(kind, 1, iters, repeats))
        together = max(ops.peak_gflops(kind, threads, iters, repeats)) if threads > 1 else one
        out["per_core"][kind] = round(one, 2)
        out[kind] = round(max(threads * one, together), 2)
    flags = isa_flags()
    if flags["amx_bf16"]:
        out["amx_bf16_torch"] = round(_library_gflops(threads, torch.bfloat16), 2)
    if flags["avx512_fp16"] or flags["amx_fp16"]:
        out["fp16_torch"] = round(_library_gflops(threads, torch.float16), 2)
    return out


def _library_gflops(threads: int, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """torch's `dtype` matmul rate at n^3 on `threads` threads: what oneDNN reaches with the CPU's native
    instructions for that dtype (AMX, AVX512-FP16), which prmkern's micro-kernels do not measure; a lower bound of
    their peak. Only called where the CPU has them (a bf16 / fp16 matmul without them is slow, below the FMA and
    vdpbf16ps peaks anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return sgemm_gflops(n, repeats, dtype)
    finally:
        torch.set_num_threads(before)


def compute_peak(peaks: dict, dtype: torch.dtype) -> tuple[float, str]:
    """The peak GFLOP/s a `dtype` model's products can reach, and the instruction that gives it."""
    kinds = [k for k in PEAK_KINDS + LIBRARY_KINDS
             if k in peaks and (k not in BF16_ONLY_KINDS or dtype == torch.bfloat16)
             and (k not in FP16_ONLY_KINDS or dtype == torch.float16)]
    if not kinds:
        raise ValueError(f"no measured peak for {dtype} in {peaks}")
    best = max(kinds, key=lambda k: peaks[k])
    return peaks[best], best


def read_bandwidth(nbytes: int = 512 << 20, threads: int | None = None, repeats: int = 7) -> dict:
    """GB/s reading a float32 buffer of `nbytes` (capped at 512 MiB, at least 64 KiB), by each method, and the
    best: `{"methods": {...}, "best": x}`."""
    threads = threads or torch.get_num_threads()
    n = max(16 << 10, min(int(nbytes), 512 << 20) // 4)
    x = torch.ones(n)
    # each method sweeps the buffer ~0.1 s at least, so a small (cache-resident) buffer is timed in many sweeps
    reps = max(repeats, int(repeats * (64 << 20) / (4 * n)))
    methods = {"torch_sum": x.numel() * 4 / _best(lambda: x.sum(), reps) / 1e9}
    ops = _ops()
    if ops is not None:  # one thread's also by its CPU time; several threads' by the wall clock only (two threads
        # sharing a core would each see a whole core's bandwidth in their CPU time)
        methods["cpp_sweep"] = ops.read_gbs(x, threads, reps)[0]
        methods["cpp_sweep_1_thread"] = max(ops.read_gbs(x, 1, reps))
    methods = {k: round(v, 2) for k, v in methods.items()}
    return dict(methods=methods, best=max(methods.values()), buffer_bytes=4 * n, threads=threads)


def read_bandwidth_gbs(mib: int = 512, repeats: int = 7) -> float:
    return read_bandwidth(mib << 20, repeats=repeats)["best"]


def sgemm_gflops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """torch's matmul rate (MKL / oneDNN): what a library reaches, not the machine's peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / _best(lambda: torch.mm(a, b), repeats) / 1e9


def ceilings(dtype: torch.dtype, working_set_bytes: int, threads: int | None = None) -> dict:
    """Every ceiling a `dtype` run's floors need, measured now at `threads` threads (default torch's count)."""
    threads = threads or torch.get_num_threads()
    peaks = peak_gflops(threads)
    if any(k in peaks for k in PEAK_KINDS):
        gflops, kind = compute_peak(peaks, dtype)
        method = (f"csrc/peak.cpp micro-kernel ({kind})" if kind in PEAK_KINDS
                  else f"torch {str(dtype).removeprefix('torch.')} matmul 2048^3 (oneDNN on the CPU's native "
                       f"{'AMX' if kind == 'amx_bf16_torch' else 'fp16'} instructions): a lower bound of their peak")
    else:
        gflops, kind = sgemm_gflops(), "torch.mm"
        method = "torch.mm fp32 1024^3 (prmkern._C unavailable: not a physical peak)"
    bw = read_bandwidth(working_set_bytes, threads)
    from benchmarks.bench_engine import cpu_isa  # the level prmkern's kernels run at
    return dict(cpu_model=cpu_model(), cpu_isa=cpu_isa(), isa_flags=isa_flags(), threads=threads,
                peaks_gflops=peaks, compute_gflops=gflops, compute_kind=kind, compute_method=method,
                read_bandwidth=bw, bandwidth_gbs=bw["best"])


def gemm_gflops(dtype: torch.dtype, sgemm: float | None = None) -> float:
    """The compute ceiling of a `dtype` model: the measured instruction peak (compute_peak), or without prmkern._C
    the better of torch's fp32 matmul rate and (bf16) its bf16 one."""
    peaks = peak_gflops(torch.get_num_threads())
    if any(k in peaks for k in PEAK_KINDS):
        return compute_peak(peaks, dtype)[0]
    fp32 = sgemm if sgemm is not None else sgemm_gflops()
    return max(fp32, sgemm_gflops(dtype=torch.bfloat16)) if dtype == torch.bfloat16 else fp32


def _weights(spec) -> tuple[int, int]:
    """(projection weights per layer, all weights read by a step: layers + LM head)."""
    h, i, v, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
    return per_layer, L * per_layer + v * h  # embedding rows read are negligible


def prefill_counts(spec, dtype: torch.dtype, prompt_len: int) -> dict:
    """FLOPs and bytes of one prefill of `prompt_len` tokens (no cached prefix): every projection weight x every
    token, causal attention (QK^T and PV over the keys at or before each query), the LM head for the last token
    only; bytes: the weights once and the K/V written."""
    per_layer, weights = _weights(spec)
    L, nh, hd = spec.num_layers, spec.num_heads, spec.head_dim
    esize = torch.finfo(dtype).bits // 8
    flops = (2 * prompt_len * L * per_layer + 2 * spec.vocab_size * spec.hidden_size
             + 4 * L * nh * hd * prompt_len * (prompt_len + 1) / 2)
    kv_bytes = 2 * L * spec.num_kv_heads * hd * esize * prompt_len
    return dict(flops=int(flops), bytes=int(weights * esize + kv_bytes))


def prefill_floor(spec, dtype: torch.dtype, prompt_len: int, bandwidth_gbs: float, gflops: float) -> dict:
    c = prefill_counts(spec, dtype, prompt_len)
    t_bw, t_fl = c["bytes"] / (bandwidth_gbs * 1e9), c["flops"] / (gflops * 1e9)
    return dict(c, bandwidth_s=t_bw, compute_s=t_fl, floor_s=max(t_bw, t_fl),
                bound="bandwidth" if t_bw >= t_fl else "compute")


def decode_step_floor(spec, dtype: torch.dtype, rows: int, prefix_len: int, mean_suffix_len: float,
                      bandwidth_gbs: float, gflops: float) -> dict:
    """The floor of one decode step of `rows` chains sharing a `prefix_len`-token prefix, each with
    `mean_suffix_len` tokens of its own; spec: the model's DecoderSpec."""
    L, kv = spec.num_layers, spec.num_kv_heads * spec.head_dim
    _, weights = _weights(spec)  # layers + LM head once (even when tied)
    esize = torch.finfo(dtype).bits // 8
    kv_tokens = prefix_len + rows * mean_suffix_len
    bytes_read = weights * esize + 2 * L * kv * esize * kv_tokens
    flops = 2 * rows * weights + 4 * L * spec.num_heads * spec.head_dim * rows * (prefix_len + mean_suffix_len)
    t_bw, t_fl = bytes_read / (bandwidth_gbs * 1e9), flops / (gflops * 1e9)
    return dict(bytes=int(bytes_read), flops=int(flops), bandwidth_s=t_bw, compute_s=t_fl, floor_s=max(t_bw, t_fl),
                bound="bandwidth" if t_bw >= t_fl else "compute")


def generation_floor(spec, dtype: torch.dtype, prompt_len: int, chains: int, gen_len: int, bandwidth_gbs: float,
                     gflops: float) -> dict:
    """The floor of a whole verification run: one prefill of the `prompt_len`-token prompt (prefill_floor), then `gen_len - 1`
    decode steps of `chains` rows (the first token of every chain is drawn from the prefill's logits), each at
    decode_step_floor. No engine can run it faster on this machine: `peer seconds / floor_s` bounds any speed-up
    over a peer (with prompt caching; the peer's own waste is not subtracted)."""
    prefill = prefill_floor(spec, dtype, prompt_len, bandwidth_gbs, gflops)
    # Whole 16-token blocks of the prompt are shared; its last partial block is each chain's own (as bench_engine's
    # per-step floor counts it).
    shared, own = prompt_len // 16 * 16, prompt_len % 16
    steps = [decode_step_floor(spec, dtype, chains, shared, own + s, bandwidth_gbs, gflops) for s in range(1, gen_len)]
    decode_s = sum(st["floor_s"] for st in steps)
    return dict(prefill_flops=prefill["flops"], prefill_bytes=prefill["bytes"], prefill_s=prefill["floor_s"],
                decode_steps=len(steps), decode_flops=sum(st["flops"] for st in steps),
                decode_bytes=sum(st["bytes"] for st in steps), decode_s=decode_s, floor_s=prefill["floor_s"] + decode_s)
