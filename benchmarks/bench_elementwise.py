"""Benchmark the memory-bound layers: rms_norm (fused residual add), rotary (in place), silu_and_mul and store_kv,
each against the torch eager code it replaces (the seam's reference semantics), in GB/s against the copy ceiling.

Default shapes: ThinkPRM-1.5B / R1-Distill-Qwen-1.5B (hidden 1536, intermediate 8960, 12 / 2 heads of 128, bf16)
at 1, 64 and 4096 tokens (a decode step of one sequence, a decode batch, a prefill chunk).
Usage: python benchmarks/bench_elementwise.py [--out] [--smoke]
"""
from __future__ import annotations

import torch
import timing

NAME = "elementwise"


def torch_rms_norm(x, weight, eps, residual):
    x = x + residual
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight, x


def torch_rotary(q, k, positions, cache):
    half = q.shape[-1] // 2
    cs = cache[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return rot(q), rot(k)


def main() -> None:
    args = timing.parse_args(__doc__)
    K = timing.import_kernels(args.smoke)
    dev = timing.device()
    if args.smoke:
        hidden, inter, hq, hkv, d, dtype, token_counts = 64, 96, 4, 2, 64, torch.float32, [3]
    else:
        hidden, inter, hq, hkv, d, dtype, token_counts = 1536, 8960, 12, 2, 128, torch.bfloat16, [1, 64, 4096]
    ceilings = timing.measure_ceilings(args.smoke, args.reps, args.warmup)
    e = torch.finfo(dtype).bits // 8
    rows = []
    for t in token_counts:
        n = 2 if args.smoke else timing.num_copies(t * (2 * hidden + 2 * inter + (hq + 2 * hkv) * d) * e)
        x = [torch.randn(t, hidden, dtype=dtype, device=dev) for _ in range(n)]
        res = [torch.randn(t, hidden, dtype=dtype, device=dev) for _ in range(n)]
        w = torch.rand(hidden, dtype=dtype, device=dev) + 0.5
        gu = [torch.randn(t, 2 * inter, dtype=dtype, device=dev) for _ in range(n)]
        q = [torch.randn(t, hq, d, dtype=dtype, device=dev) for _ in range(n)]
        k = [torch.randn(t, hkv, d, dtype=dtype, device=dev) for _ in range(n)]
        cache = torch.randn(8192, d, device=dev)
        pos = torch.randint(0, 8192, (t,), device=dev)
        bs = 16
        kc = torch.zeros(-(-t // bs) * n + 1, bs, hkv, d, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        slots = [torch.arange(i * t, (i + 1) * t, device=dev) for i in range(n)]
        cases = {
            # name: (ours, torch eager, bytes moved)
            "rms_norm+residual": (lambda i: K.rms_norm(x=x[i], weight=w, eps=1e-6, residual=res[i]),
                                  lambda i: torch_rms_norm(x[i], w, 1e-6, res[i]), 4 * t * hidden * e),
            "rotary": (lambda i: K.rotary(q=q[i], k=k[i], positions=pos, cos_sin_cache=cache),
                       lambda i: torch_rotary(q[i], k[i], pos, cache), 2 * t * (hq + hkv) * d * e + t * d * 4),
            "silu_and_mul": (lambda i: K.silu_and_mul(x=gu[i]),
                             lambda i: torch.nn.functional.silu(gu[i][:, :inter]) * gu[i][:, inter:],
                             3 * t * inter * e),
            "store_kv": (lambda i: K.store_kv(key=k[i], value=k[i], k_cache=kc, v_cache=vc, slot_mapping=slots[i]),
                         lambda i: (kc.view(-1, hkv, d).index_copy_(0, slots[i], k[i]),
                                    vc.view(-1, hkv, d).index_copy_(0, slots[i], k[i])), 4 * t * hkv * d * e),
        }
        for name, (ours, theirs, nbytes) in cases.items():
            a = timing.time_fn(ours, n, args.reps, args.warmup)["median_ms"]
            b = timing.time_fn(theirs, n, args.reps, args.warmup)["median_ms"]
            rows.append({"op": name, "tokens": t, "copies": n, "ms": timing.sig(a),
                         **timing.rate(nbytes, 0, a, ceilings), "torch_ms": timing.sig(b),
                         "speedup_vs_torch": timing.sig(b / a)})
    timing.print_table(rows, ["op", "tokens", "ms", "gbps", "frac_copy_bw", "torch_ms", "speedup_vs_torch"])
    config = {"hidden": hidden, "intermediate": inter, "num_heads": hq, "num_kv_heads": hkv, "head_dim": d,
              "dtype": str(dtype).replace("torch.", ""), "tokens": token_counts, "reps": args.reps,
              "warmup": args.warmup}
    timing.finish(NAME, args, ceilings, config, rows, {})


if __name__ == "__main__":
    main()
