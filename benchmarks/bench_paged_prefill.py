"""Benchmark paged_prefill: whole prompts and extensions after a cached prefix, against torch SDPA over the same
data laid out contiguously (causal; an explicit mask where new tokens sit after a cached prefix).

Reports time, TFLOP/s against the measured bf16 matmul ceiling (prefill is compute-bound) and GB/s against the copy
ceiling. Default shapes: ThinkPRM-1.5B (12 query heads, 2 KV heads, head dim 128, bf16, block size 16).
Usage: python benchmarks/bench_paged_prefill.py [--out] [--smoke]
"""
from __future__ import annotations

import torch
import timing

NAME = "paged_prefill"


def make_inputs(num_seqs: int, q_len: int, ctx_len: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
                dev: torch.device, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq_len = ctx_len + q_len
    nblk = -(-seq_len // bs)
    k_cache = torch.randn(num_seqs * nblk, bs, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_seqs * nblk, generator=g).view(num_seqs, nblk).to(torch.int32)
    i32 = dict(dtype=torch.int32, device=dev)
    cont = lambda c: c[tables.long().to(dev)].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()  # noqa: E731
    return dict(q=torch.randn(num_seqs * q_len, hq, d, dtype=dtype, device=dev), k_cache=k_cache, v_cache=v_cache,
                block_tables=tables.to(dev), seq_lens=torch.full((num_seqs,), seq_len, **i32),
                cu_seqlens_q=torch.arange(0, (num_seqs + 1) * q_len, q_len, **i32),
                k_cont=cont(k_cache), v_cont=cont(v_cache))  # [num_seqs, hkv, seq_len, d]


def main() -> None:
    args = timing.parse_args(__doc__)
    K = timing.import_kernels(args.smoke)
    dev = timing.device()
    if args.smoke:
        hq, hkv, d, bs, dtype = 4, 2, 64, 16, torch.float32
        sweep = [(1, 17, 0), (2, 5, 20)]
    else:
        hq, hkv, d, bs, dtype = 12, 2, 128, 16, torch.bfloat16
        # (sequences, new tokens each, cached tokens each): fresh prompts, chunked prefill, extension after a hit
        sweep = [(1, 512, 0), (1, 2048, 0), (1, 8192, 0), (4, 2048, 0), (1, 2048, 6144), (8, 256, 4096),
                 (32, 64, 2048)]
        if args.quick:
            sweep = [(1, 2048, 0), (1, 2048, 6144), (8, 256, 4096)]
    ceilings = timing.measure_ceilings(args.smoke, args.reps, args.warmup)
    elem = torch.finfo(dtype).bits // 8
    scale = d ** -0.5
    rows = []
    for num_seqs, q_len, ctx_len in sweep:
        seq_len = ctx_len + q_len
        kv_bytes = 2 * num_seqs * seq_len * hkv * d * elem
        copies = timing.num_copies(2 * kv_bytes, smoke=args.smoke)
        inputs = [make_inputs(num_seqs, q_len, ctx_len, hq, hkv, d, bs, dtype, dev, seed=i) for i in range(copies)]
        visible = sum(ctx_len + i + 1 for i in range(q_len))  # causal key count summed over one sequence's queries
        flops = 4 * num_seqs * hq * d * visible
        bytes_moved = kv_bytes + 2 * num_seqs * q_len * hq * d * elem
        # SDPA: is_causal is top-left aligned, so with a cached prefix the mask is explicit (bottom-right causal).
        mask = (torch.arange(seq_len, device=dev)[None, :] <= torch.arange(ctx_len, seq_len, device=dev)[:, None])

        def run(i):
            x = inputs[i]
            return K.paged_prefill(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"],
                                   cu_seqlens_q=x["cu_seqlens_q"], seq_lens=x["seq_lens"],
                                   block_tables=x["block_tables"], scale=scale, max_q_len=q_len)

        def sdpa(i):
            x = inputs[i]
            q = x["q"].view(num_seqs, q_len, hq, d).transpose(1, 2)
            kw = dict(is_causal=True) if ctx_len == 0 else dict(attn_mask=mask)
            return torch.nn.functional.scaled_dot_product_attention(q, x["k_cont"], x["v_cont"], scale=scale,
                                                                    enable_gqa=True, **kw)

        t = timing.time_fn(run, copies, args.reps, args.warmup)["median_ms"]
        ts = timing.time_fn(sdpa, copies, args.reps, args.warmup)["median_ms"]
        ref = sdpa(0).transpose(1, 2).reshape(num_seqs * q_len, hq, d).float()
        rows.append({"num_seqs": num_seqs, "q_len": q_len, "ctx_len": ctx_len, "copies": copies,
                     "ms": timing.sig(t), **timing.rate(bytes_moved, flops, t, ceilings),
                     "sdpa_ms": timing.sig(ts), "sdpa_tflops": timing.rate(bytes_moved, flops, ts, ceilings)["tflops"],
                     "speedup_vs_sdpa": timing.sig(ts / t),
                     "max_abs_err_vs_sdpa": float((run(0).float() - ref).abs().max())})
        del inputs

    timing.print_table(rows, ["num_seqs", "q_len", "ctx_len", "ms", "tflops", "frac_matmul", "gbps", "sdpa_ms",
                              "speedup_vs_sdpa", "max_abs_err_vs_sdpa"])
    config = {"num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "block_size": bs,
              "dtype": str(dtype).replace("torch.", ""), "reps": args.reps, "warmup": args.warmup,
              "sweep": [{"num_seqs": n, "q_len": q, "ctx_len": c} for n, q, c in sweep]}
    summary = {"best_frac_matmul": max(r["frac_matmul"] for r in rows),
               "min_speedup_vs_sdpa": min(r["speedup_vs_sdpa"] for r in rows)}
    timing.finish(NAME, args, ceilings, config, rows, summary)


if __name__ == "__main__":
    main()
