"""Each kernel benchmark runs end to end with --smoke (tiny sizes; on a CPU under the Triton interpreter) and its
last stdout line is one JSON document with the keys the results format promises; --out writes the same document."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"bench", "date", "commit", "device", "smoke", "ceilings", "config", "summary", "rows"}
ROW_KEYS = {
    "bench_paged_decode.py": {"batch", "seq_len", "ms", "gbps", "frac_copy_bw", "sdpa_ms", "max_abs_err_vs_sdpa"},
    "bench_shared_prefix_decode.py": {"prefix_len", "chains", "cascade_ms", "paged_ms", "paged_copied_ms", "sdpa_ms",
                                      "ideal_ms", "speedup_vs_paged", "cascade_over_ideal", "max_abs_err_vs_paged"},
    "bench_paged_prefill.py": {"num_seqs", "q_len", "ctx_len", "ms", "tflops", "sdpa_ms", "max_abs_err_vs_sdpa"},
    "bench_elementwise.py": {"op", "tokens", "ms", "gbps", "torch_ms"},
}


@pytest.mark.parametrize("script", sorted(ROW_KEYS))
def test_bench_smoke_prints_json_last(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(doc), f"{script}: missing keys {KEYS - set(doc)}"
    assert doc["smoke"] is True and doc["rows"], f"{script}: no rows"
    for row in doc["rows"]:
        assert ROW_KEYS[script] <= set(row), f"{script}: row missing {ROW_KEYS[script] - set(row)}"
        assert all(v is None or v == v for v in row.values()), f"{script}: NaN in {row}"  # NaN != NaN
    for key in ("copy_gbps", "matmul_tflops"):
        assert doc["ceilings"][key] > 0, f"{script}: ceiling {key} not measured: {doc['ceilings']}"
    for row in doc["rows"]:  # each bench checks its kernel against a peer on the same data
        for key in ("max_abs_err_vs_sdpa", "max_abs_err_vs_paged"):
            if key in row:
                assert row[key] < 1e-3, f"{script}: {key} = {row[key]}"
    assert json.loads(out.read_text()) == doc


def test_bench_engine_smoke(tmp_path):
    """bench_engine.py end to end at tiny sizes: both engines, interleaved pairs, prefill computed once."""
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_engine.py"), "--smoke", "--pairs", "2",
                           "--threads", "1", "--roofline", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text())
    assert len(doc["prmkern_runs_s"]) == len(doc["transformers_runs_s"]) == 2 and doc["speedup"] > 0
    assert doc["stats"]["prefill_tokens"] == doc["prompt_len"] and doc["stats"]["generated_tokens"] == 4 * 8
    roof = doc["roofline"]
    assert roof["exceeded"] == [] and roof["cpu_model"] and roof["cpu_isa"] is not None
    for name, rep in roof["engines"].items():  # no engine beats a physical floor
        run = rep["run"]  # the whole-run floor: a prefill plus gen_len - 1 decode steps
        assert run["decode_steps"] == doc["gen_len"] - 1 and run["floor_s"] == run["prefill_s"] + run["decode_s"] > 0
        assert 0 < rep["run_fraction"] <= 1, (name, rep["run_fraction"])
        for part in ("prefill", "decode_step"):
            if name.startswith("prmkern"):
                assert 0 < rep[part]["fraction"] <= 1, (name, part, rep[part])


def test_generation_floor_counts_the_run():
    """benchmarks/roofline.py's whole-run floor, against the FLOPs written out for a toy shape: hidden 8, 2 layers,
    2 / 1 heads of 4, intermediate 16, vocabulary 10; prompt 32, 3 chains, 3 tokens (2 decode steps)."""
    sys.path.insert(0, str(REPO))
    from types import SimpleNamespace

    import torch

    from benchmarks.roofline import decode_step_floor, generation_floor
    spec = SimpleNamespace(hidden_size=8, intermediate_size=16, vocab_size=10, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=4)
    per_layer = 8 * (8 + 2 * 4) + 8 * 8 + 8 * 32 + 16 * 8  # qkv, o, gate_up, down weights = 576
    prefill = 2 * 32 * 2 * per_layer + 2 * 10 * 8 + 4 * 2 * 2 * 4 * 32 * 33 / 2  # projections, LM head row, causal
    r = generation_floor(spec, torch.float32, 32, 3, 3, bandwidth_gbs=10.0, gflops=1.0)
    assert r["prefill_flops"] == prefill and r["prefill_s"] == pytest.approx(prefill / 1e9)
    steps = [decode_step_floor(spec, torch.float32, 3, 32, s, 10.0, 1.0)["floor_s"] for s in (1, 2)]
    assert r["decode_steps"] == 2 and r["decode_s"] == pytest.approx(sum(steps))
    # a decode step of 3 rows: 2 FLOPs per weight (layers + LM head) per row + attention over 32 + s keys
    assert steps[0] == pytest.approx((2 * 3 * (2 * per_layer + 80) + 4 * 2 * 2 * 4 * 3 * 33) / 1e9)


def test_bench_cpu_gemm_smoke(tmp_path):
    """bench_cpu_gemm.py end to end at one tiny shape: every variant (C++ on the weight / on panels / torch, cached /
    streamed, fp32 / bf16) gives a positive rate, and --out writes the document printed last."""
    pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
    out = tmp_path / "gemm.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_gemm.py"), "--smoke", "--rows", "3",
                           "--threads", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text()) and doc["smoke"] is True
    variants = {(r["weight"], r["x"], r["variant"]) for r in doc["rows"]}
    assert len(variants) == 16 and all(r["gflops"] > 0 and r["M"] == 3 for r in doc["rows"])


def test_bench_cpu_sampler_smoke(tmp_path):
    """bench_cpu_sampler.py end to end at one tiny shape: the C++ and torch draws agree and both are timed."""
    pytest.importorskip("prmkern._C", reason="prmkern._C (csrc/) is not built")
    out = tmp_path / "sampler.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_sampler.py"), "--smoke", "--threads",
                           "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text()) and doc["smoke"] is True
    assert [(r["rows"], r["vocab"]) for r in doc["rows"]] == [(3, 1000)]
    assert all(r["cpp_ms"] > 0 and r["torch_ms"] > 0 for r in doc["rows"])
