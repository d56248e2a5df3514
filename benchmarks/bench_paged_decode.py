"""Benchmark paged_decode: time, achieved GB/s against the measured copy bandwidth, and torch SDPA over the same
data laid out contiguously (the best a user gets without paging), side by side.

Default sweep: ThinkPRM-1.5B attention shapes (12 query heads, 2 KV heads, head dim 128, bf16, block size 16),
batch x tokens per sequence. Target (issue 3): >= 80% of copy bandwidth at 4K+ tokens and 32+ sequences. Each row
carries the traffic model's bytes and floor (benchmarks/traffic_model.py, --model-gpu, H200 by default) and the
measured time's achieved GB/s and % of that floor.
Usage: python benchmarks/bench_paged_decode.py [--out] [--smoke]
"""
from __future__ import annotations

import torch
import timing
import traffic_model as tm

NAME = "paged_decode"


def make_inputs(batch: int, seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, dev: torch.device, seed: int) -> dict:
    """Paged caches with each sequence's blocks scattered at random, and the same K/V contiguous for SDPA."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblk = -(-seq_len // block_size)
    num_blocks = batch * nblk
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, generator=g).view(batch, nblk).to(torch.int32).to(dev)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=dev)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=dev))


def contiguous(inp: dict, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, Hkv, seq_len, D] K and V gathered from the paged cache (SDPA's layout)."""
    def gather(cache):
        b = cache[inp["block_tables"].long()]  # [batch, nblk, block_size, Hkv, D]
        return b.flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()
    return gather(inp["k_cache"]), gather(inp["v_cache"])


def main() -> None:
    args = timing.parse_args(__doc__, extra=lambda ap: ap.add_argument("--model-gpu", default="H200",
                                                                       choices=sorted(tm.GPUS)))
    K = timing.import_kernels(args.smoke)
    dev = timing.device()
    if args.smoke:
        shape = dict(num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
        sweep = [(2, 33)]
    else:
        shape = dict(num_heads=12, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16)
        sweep = [(b, n) for b in (1, 8, 32, 64, 128) for n in (1024, 4096, 8192, 16384)]
        if args.quick:  # the goal shape first
            sweep = [(32, 4096), (64, 8192), (8, 1024), (128, 16384)]
    ceilings = timing.measure_ceilings(args.smoke, args.reps, args.warmup)
    hq, hkv, d, dtype = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["dtype"]
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for batch, seq_len in sweep:
        kv_bytes = 2 * batch * seq_len * hkv * d * elem
        copies = timing.num_copies(kv_bytes, smoke=args.smoke)
        inputs = [make_inputs(batch, seq_len, hq, hkv, d, shape["block_size"], dtype, dev, seed=i)
                  for i in range(copies)]
        scale = d ** -0.5
        bytes_moved = kv_bytes + 2 * batch * hq * d * elem + batch * hq * 4  # K, V, q, out, lse
        flops = 4 * batch * hq * seq_len * d

        def run(i):
            x = inputs[i]
            return K.paged_decode(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"],
                                  block_tables=x["block_tables"], seq_lens=x["seq_lens"], scale=scale,
                                  max_seq_len=seq_len)

        t = timing.time_fn(run, copies, args.reps, args.warmup)
        model = tm.paged_decode_model(batch, seq_len, num_heads=hq, num_kv_heads=hkv, head_dim=d, itemsize=elem,
                                      gpu=tm.GPUS[args.model_gpu])
        row = {"batch": batch, "seq_len": seq_len, "copies": copies, "ms": timing.sig(t["median_ms"]),
               **timing.rate(bytes_moved, flops, t["median_ms"], ceilings),
               "model_gpu": args.model_gpu, "model_bytes": model["total_bytes"], "model_floor_us": model["floor_us"],
               "model_launches": model["launches"], "model_splits": model["splits"],
               **{f"model_{k}": v for k, v in tm.achieved(model, t["median_ms"]).items()}}

        # Peer: SDPA over the same data, contiguous [batch, heads, len, D] (GQA without expanding K/V).
        conts = [contiguous(x, seq_len) for x in inputs]
        qs = [x["q"][:, :, None, :] for x in inputs]  # [batch, Hq, 1, D]

        def sdpa(i):
            k, v = conts[i]
            return torch.nn.functional.scaled_dot_product_attention(qs[i], k, v, scale=scale, enable_gqa=True)

        ts = timing.time_fn(sdpa, copies, args.reps, args.warmup)
        row.update(sdpa_ms=timing.sig(ts["median_ms"]), sdpa_gbps=timing.rate(bytes_moved, flops, ts["median_ms"],
                                                                            ceilings)["gbps"],
                   speedup_vs_sdpa=timing.sig(ts["median_ms"] / t["median_ms"]))
        out, _ = run(0)
        row["max_abs_err_vs_sdpa"] = float((out.float() - sdpa(0)[:, :, 0].float()).abs().max())
        rows.append(row)
        del inputs, conts, qs

    timing.print_table(rows, ["batch", "seq_len", "ms", "gbps", "frac_copy_bw", "model_floor_us",
                              "model_pct_of_floor", "tflops", "sdpa_ms",
                              "speedup_vs_sdpa", "max_abs_err_vs_sdpa"])
    big = [r for r in rows if r["seq_len"] >= 4096 and r["batch"] >= 32]
    summary = {"target": "frac_copy_bw >= 0.8 at seq_len >= 4096 and batch >= 32",
               "min_frac_copy_bw_at_target_shapes": min((r["frac_copy_bw"] for r in big), default=None)}
    config = {**{k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in shape.items()},
              "sweep": [{"batch": b, "seq_len": n} for b, n in sweep], "reps": args.reps, "warmup": args.warmup}
    timing.finish(NAME, args, ceilings, config, rows, summary)


if __name__ == "__main__":
    main()
