"""Benchmark cascade decode (cascade_decode: one fused launch, exactly what TritonBackend.decode runs for a sharing
group; and the previous three launches shared_prefix_decode + paged_decode + merge_states) against the same work
without sharing, swept over prefix length and number of chains, with a PNG of the speed-up. Each row carries the
traffic model (benchmarks/traffic_model.py, for the GPU named by --model-gpu, H200 by default): bytes, floor time,
launches, and the measured time's achieved GB/s and % of that floor.

Peers, same data, same process:
- paged_decode over the full block tables, the prefix blocks physically shared (the engine's cache without the
  cascade path: every chain re-reads the prefix, partly from L2);
- paged_decode with each chain's prefix copied into its own blocks (no sharing at all, in memory or in reads);
- torch SDPA over the same K/V laid out contiguously per chain (what a user gets without paging).
`ideal_ms` is the time to read the unique KV once (prefix once + every suffix) at the measured copy bandwidth.
Targets (issue 3, ThinkPRM-1.5B shapes): 64 chains, 8K prefix, 256-token suffixes: >= 10x faster than paged_decode
without sharing and within 1.5x of ideal_ms. The sweep also locates the break-even (TritonBackend's thresholds).
Usage: python benchmarks/bench_shared_prefix_decode.py [--out] [--smoke]
"""
from __future__ import annotations

from pathlib import Path

import torch
import timing
import traffic_model as tm

NAME = "shared_prefix_decode"


def make_inputs(prefix_len: int, chains: int, suffix_len: int, hq: int, hkv: int, d: int, bs: int,
                dtype: torch.dtype, dev: torch.device, seed: int) -> dict:
    """One group: prefix_len tokens (whole blocks) shared by `chains` chains, each with suffix_len own tokens;
    plus a second cache in which every chain owns a copy of the prefix."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pb, sb = prefix_len // bs, -(-suffix_len // bs)
    num_blocks = pb + chains * sb
    k_cache = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    prefix_ids = perm[:pb]
    suffix_ids = perm[pb:].view(chains, sb)
    full = torch.cat((prefix_ids.expand(chains, pb), suffix_ids), dim=1)  # [chains, pb + sb]
    # Copied layout: block ids [chains * (pb + sb)], chain c's prefix copied into its own blocks.
    k_copy = k_cache[full.long()].flatten(0, 1)  # [chains * (pb + sb), bs, hkv, d]
    v_copy = v_cache[full.long()].flatten(0, 1)
    copy_tables = torch.arange(chains * (pb + sb), dtype=torch.int32).view(chains, pb + sb)
    i32 = dict(dtype=torch.int32, device=dev)
    return dict(
        q=torch.randn(chains, hq, d, dtype=dtype, device=dev), k_cache=k_cache, v_cache=v_cache,
        full_tables=full.to(dev), seq_lens=torch.full((chains,), prefix_len + suffix_len, **i32),
        suffix_tables=suffix_ids.contiguous().to(dev), suffix_lens=torch.full((chains,), suffix_len, **i32),
        group_starts=torch.tensor([0, chains], **i32), prefix_lens=torch.tensor([prefix_len], **i32),
        prefix_tables=prefix_ids[None].to(dev), k_copy=k_copy, v_copy=v_copy, copy_tables=copy_tables.to(dev),
        # SDPA layout [chains, hkv, prefix + suffix, d]
        k_cont=k_copy.view(chains, (pb + sb) * bs, hkv, d)[:, :prefix_len + suffix_len].transpose(1, 2).contiguous(),
        v_cont=v_copy.view(chains, (pb + sb) * bs, hkv, d)[:, :prefix_len + suffix_len].transpose(1, 2).contiguous(),
    )


def plot(rows: list[dict], path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable: plot skipped"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in ((axes[0], "speedup_vs_paged", "vs paged_decode, prefix blocks shared in memory"),
                           (axes[1], "speedup_vs_paged_copied", "vs paged_decode, prefix copied per chain")):
        for chains in sorted({r["chains"] for r in rows}):
            pts = sorted((r["prefix_len"], r[key]) for r in rows if r["chains"] == chains)
            ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o", label=f"{chains} chains")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("shared prefix length (tokens)")
        ax.set_ylabel("cascade speed-up (x)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def main() -> None:
    args = timing.parse_args(__doc__, extra=lambda ap: ap.add_argument("--model-gpu", default="H200",
                                                                       choices=sorted(tm.GPUS)))
    K = timing.import_kernels(args.smoke)
    dev = timing.device()
    if args.smoke:
        hq, hkv, d, bs, dtype, suffix_len = 4, 2, 64, 16, torch.float32, 5
        sweep = [(p, c) for p in (16, 32) for c in (2, 3)]
    else:
        hq, hkv, d, bs, dtype, suffix_len = 12, 2, 128, 16, torch.bfloat16, 256
        sweep = [(p, c) for p in (128, 256, 512, 1024, 2048, 4096, 8192) for c in (2, 4, 8, 16, 32, 64)]
        if args.quick:  # the goal shape first, then the break-even region
            sweep = [(8192, 64), (2048, 32), (512, 8), (256, 4), (128, 2), (1024, 2)]
    ceilings = timing.measure_ceilings(args.smoke, args.reps, args.warmup)
    elem = torch.finfo(dtype).bits // 8
    scale = d ** -0.5
    token_bytes = 2 * hkv * d * elem  # K + V of one token, one layer
    rows = []
    for prefix_len, chains in sweep:
        unique = (prefix_len + chains * suffix_len) * token_bytes
        copied = chains * (prefix_len + suffix_len) * token_bytes
        copies = timing.num_copies(unique + copied, smoke=args.smoke)
        inputs = [make_inputs(prefix_len, chains, suffix_len, hq, hkv, d, bs, dtype, dev, seed=i)
                  for i in range(copies)]
        f32 = dict(dtype=torch.float32, device=dev)
        bufs = dict(p_out=torch.empty(chains, hq, d, **f32), s_out=torch.empty(chains, hq, d, **f32),
                    out=torch.empty(chains, hq, d, dtype=dtype, device=dev))

        def cascade(i):
            x = inputs[i]
            return K.cascade_decode(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"],
                                    group_starts=x["group_starts"], prefix_lens=x["prefix_lens"],
                                    prefix_block_tables=x["prefix_tables"], suffix_lens=x["suffix_lens"],
                                    suffix_block_tables=x["suffix_tables"], scale=scale, max_group_size=chains,
                                    max_prefix_len=prefix_len, max_suffix_len=suffix_len, out=bufs["out"])[0]

        def three_launches(i):
            x = inputs[i]
            p_out, p_lse = K.shared_prefix_decode(
                q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"], group_starts=x["group_starts"],
                prefix_lens=x["prefix_lens"], prefix_block_tables=x["prefix_tables"], scale=scale,
                max_group_size=chains, max_prefix_len=prefix_len, out=bufs["p_out"])
            s_out, s_lse = K.paged_decode(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"],
                                          block_tables=x["suffix_tables"], seq_lens=x["suffix_lens"], scale=scale,
                                          max_seq_len=suffix_len, out=bufs["s_out"])
            return K.merge_states(out_a=s_out, lse_a=s_lse, out_b=p_out, lse_b=p_lse, out=bufs["out"])[0]

        def prefix_only(i):
            x = inputs[i]
            return K.shared_prefix_decode(
                q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"], group_starts=x["group_starts"],
                prefix_lens=x["prefix_lens"], prefix_block_tables=x["prefix_tables"], scale=scale,
                max_group_size=chains, max_prefix_len=prefix_len, out=bufs["p_out"])

        def paged(i):
            x = inputs[i]
            return K.paged_decode(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"], block_tables=x["full_tables"],
                                  seq_lens=x["seq_lens"], scale=scale, max_seq_len=prefix_len + suffix_len)[0]

        def paged_copied(i):
            x = inputs[i]
            return K.paged_decode(q=x["q"], k_cache=x["k_copy"], v_cache=x["v_copy"], block_tables=x["copy_tables"],
                                  seq_lens=x["seq_lens"], scale=scale, max_seq_len=prefix_len + suffix_len)[0]

        def sdpa(i):
            x = inputs[i]
            return torch.nn.functional.scaled_dot_product_attention(x["q"][:, :, None], x["k_cont"], x["v_cont"],
                                                                    scale=scale, enable_gqa=True)[:, :, 0]

        t = {name: timing.time_fn(fn, copies, args.reps, args.warmup)["median_ms"]
             for name, fn in (("cascade", cascade), ("three_launches", three_launches), ("prefix_only", prefix_only),
                              ("paged", paged),
                              ("paged_copied", paged_copied), ("sdpa", sdpa))}
        ideal_ms = unique / (ceilings["copy_gbps"] * 1e9) * 1e3
        ref = paged_copied(0).float()
        shape = tm.DecodeShape(prefix_len, chains, suffix_len, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                               itemsize=elem, block_size=bs)
        model = tm.cascade_fused(shape, tm.GPUS[args.model_gpu])
        old_model = tm.cascade_three_launches(shape, tm.GPUS[args.model_gpu])
        fit = tm.achieved(model, t["cascade"])
        rows.append({
            "prefix_len": prefix_len, "chains": chains, "suffix_len": suffix_len, "copies": copies,
            "cascade_ms": timing.sig(t["cascade"]), "three_launches_ms": timing.sig(t["three_launches"]),
            "prefix_only_ms": timing.sig(t["prefix_only"]),
            "model_gpu": args.model_gpu, "model_bytes": model["total_bytes"], "model_floor_us": model["floor_us"],
            "model_launches": model["launches"], "model_splits": [model["prefix_splits"], model["suffix_splits"]],
            "model_state_over_kv": model["state_over_kv"], "model_three_launch_bytes": old_model["total_bytes"],
            "cascade_achieved_gbps": fit["achieved_gbps"], "cascade_pct_of_model_floor": fit["pct_of_floor"],
            "paged_ms": timing.sig(t["paged"]), "paged_copied_ms": timing.sig(t["paged_copied"]),
            "sdpa_ms": timing.sig(t["sdpa"]), "ideal_ms": timing.sig(ideal_ms),
            "speedup_vs_paged": timing.sig(t["paged"] / t["cascade"]),
            "speedup_vs_paged_copied": timing.sig(t["paged_copied"] / t["cascade"]),
            "speedup_vs_sdpa": timing.sig(t["sdpa"] / t["cascade"]),
            "cascade_over_ideal": timing.sig(t["cascade"] / ideal_ms),
            "cascade_gbps_unique": timing.rate(unique, 0, t["cascade"], ceilings)["gbps"],
            "max_abs_err_vs_paged": float((cascade(0).float() - ref).abs().max()),
        })
        del inputs, bufs

    timing.print_table(rows, ["prefix_len", "chains", "cascade_ms", "three_launches_ms", "paged_ms",
                              "paged_copied_ms", "sdpa_ms", "ideal_ms", "model_floor_us", "cascade_achieved_gbps",
                              "cascade_pct_of_model_floor", "speedup_vs_paged", "speedup_vs_paged_copied",
                              "speedup_vs_sdpa", "cascade_over_ideal", "max_abs_err_vs_paged"])
    target = [r for r in rows if r["prefix_len"] == 8192 and r["chains"] == 64]
    break_even = {}
    for chains in sorted({r["chains"] for r in rows}):
        wins = [r["prefix_len"] for r in rows if r["chains"] == chains and r["speedup_vs_paged"] > 1.0]
        break_even[str(chains)] = min(wins) if wins else None
    summary = {"target": "64 chains, 8K prefix, 256 suffix: speedup_vs_paged >= 10 and cascade_over_ideal <= 1.5",
               "at_target": target[0] if target else None,
               "break_even_prefix_len_by_chains": break_even}
    config = {"num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "block_size": bs,
              "dtype": str(dtype).replace("torch.", ""), "suffix_len": suffix_len,
              "sweep": [{"prefix_len": p, "chains": c} for p, c in sweep], "reps": args.reps, "warmup": args.warmup}
    if args.out is not None:
        gpu = (timing.device_info().get("gpu") or "cpu").replace(" ", "_")
        png = (Path(args.out).with_suffix(".png") if args.out else
               timing.RESULTS / f"{NAME}{'_smoke' if args.smoke else ''}_speedup_{gpu}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        print(plot(rows, png))
    else:
        print("plot written only with --out")
    timing.finish(NAME, args, ceilings, config, rows, summary)


if __name__ == "__main__":
    main()
