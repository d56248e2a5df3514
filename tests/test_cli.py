"""`prmkern generate` and `prmkern demo` as a user runs them (in a subprocess, JSONL in and out)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, stdin: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "prmkern.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_jsonl_with_a_bad_record(qwen2_dir, tmp_path):
    records = [{"prompt": "the step is correct", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
               {"prompt_token_ids": [1, 2, 3], "n": 3, "max_tokens": 4, "ignore_eos": True, "seed": 1},
               {"prompt": "x", "max_tokens": 0},
               {"prompt_token_ids": [7] * 2000}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--model", qwen2_dir, "--device", "cpu", str(src), "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["error"] is None and len(rows[0]["outputs"][0]["token_ids"]) == 5
    assert len(rows[1]["outputs"]) == 3
    assert "max_tokens" in rows[2]["error"] and "accepted" in rows[2]["error"]
    assert "max_model_len" in rows[3]["error"]
    assert "chains/s" in proc.stderr and "from prefix cache" in proc.stderr


def test_demo_on_embedded_default(tmp_path):
    proc = run_cli("demo", "--device", "cpu", "--chains", "4", "--prompt-len", "64", "--gen-len", "8",
                   "--no-progress", env_extra={"PRMKERN_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["prefill_tokens"] == 64 and stats["generated_tokens"] == 32


def test_verify_on_bundled_records_and_eval(qwen2_dir, tmp_path):
    out = tmp_path / "verify.jsonl"
    proc = run_cli("verify", "--model", qwen2_dir, "--device", "cpu", "--chains", "2", "--max-tokens", "8",
                   "--limit", "2", "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["chains"]) == 2 and "step_scores" in r for r in rows)
    assert "verdicts" in proc.stderr and "chains/s" in proc.stderr and "F1" in proc.stderr
    sub = tmp_path / "gsm8k.jsonl"
    sub.write_text("\n".join(open(os.path.join(REPO, "prmkern/data/processbench_sample.jsonl")).read()
                             .splitlines()[:2]) + "\n")
    proc = run_cli("eval", "processbench", str(sub), "--model", qwen2_dir, "--device", "cpu", "--chains", "1",
                   "--max-tokens", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The official F1 is NaN when both accuracies are 0 (a random model), reported as such.
    assert set(report) == {"gsm8k", "mean_f1"} and (0.0 <= report["mean_f1"] <= 1.0 or report["mean_f1"] != report["mean_f1"])
