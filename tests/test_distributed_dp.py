"""Data-parallel jobs under torchrun on the CPU (gloo): 2 ranks write the same bytes as one process (greedy), also
with a tensor-parallel engine in each rank; a rank that raises has its records reported and the others kept, a
killed rank loses only its chunk in flight, and the job resumes with a different number of ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from prmkern import cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), "-m", "prmkern", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PRMKERN_DP_CHUNK": "1", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _parts_records(output: str) -> int:
    parts = output + ".parts"
    return sum(1 for name in os.listdir(parts) if name.endswith(".jsonl")
               for line in open(os.path.join(parts, name)) if line.strip())


def test_dp_generate_two_ranks_with_tp2_engines_equals_one_process(tmp_path, qwen2_dir):
    """2 data-parallel ranks, each hosting a 2-rank tensor-parallel engine (its ranks outside torchrun's group)."""
    records = [{"prompt_token_ids": [5 + i, 7, 11 + 3 * i, 2][: 2 + i % 3], "max_tokens": 3 + i % 4} for i in range(5)]
    records[2]["id"] = "named"
    records[3] = {"prompt_token_ids": [1, 600], "max_tokens": 3}  # out of vocabulary: fails alone, in its place
    inp = _write(tmp_path / "in.jsonl", records)
    args = ["generate", inp, "--model", qwen2_dir, "--device", "cpu", "--temperature", "0", "--no-progress"]
    single, multi = str(tmp_path / "single.jsonl"), str(tmp_path / "dp.jsonl")
    assert cli.main(args + ["-o", single]) == 0
    run = torchrun(2, args + ["-o", multi, "--tensor-parallel-size", "2"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert open(multi, "rb").read() == open(single, "rb").read()
    assert "error" in json.loads(open(multi).read().splitlines()[3])
    assert not os.path.exists(multi + ".parts")


def test_dp_verify_failed_rank_reported_killed_rank_resumed(tmp_path, qwen2_dir):
    records = [{"problem": f"What is {i} + {i + 1}?", "steps": [f"We add {i} and {i + 1}.", f"It is {2 * i + 1}."],
                "label": -1} for i in range(6)]
    records[4]["id"] = "p-4"
    inp = _write(tmp_path / "in.jsonl", records)
    args = ["verify", inp, "--model", qwen2_dir, "--device", "cpu", "--temperature", "0", "--chains", "2",
            "--max-tokens", "6", "--no-progress"]
    single, multi = str(tmp_path / "single.jsonl"), str(tmp_path / "dp.jsonl")
    assert cli.main(args + ["-o", single]) == 0
    # 1. rank 1 raises after its first record: its two others are reported, rank 0's three are kept
    run = torchrun(2, args + ["-o", multi], PRMKERN_DP_FAULT="1:1:raise")
    assert run.returncode != 0
    assert "rank 1 failed on 2 records (indices [3, 5])" in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(multi) and _parts_records(multi) == 4
    # 2. 2 ranks over the 2 left; rank 1 is killed (SIGKILL) after its record: torchrun stops the job
    run = torchrun(2, args + ["-o", multi], PRMKERN_DP_FAULT="1:1")
    assert run.returncode != 0 and "resuming: 4 of 6 records done" in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(multi) and _parts_records(multi) >= 5
    # 3. one rank finishes the job: the merged file is what one process writes
    run = torchrun(1, args + ["-o", multi])
    assert run.returncode == 0, run.stderr[-3000:]
    assert open(multi, "rb").read() == open(single, "rb").read()
    assert not os.path.exists(multi + ".parts")


def test_dp_refuses_stdout(monkeypatch, tmp_path, qwen2_dir):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    inp = _write(tmp_path / "in.jsonl", [{"prompt_token_ids": [1, 2]}])
    with pytest.raises(SystemExit, match="need -o FILE"):
        cli.main(["generate", inp, "--model", qwen2_dir, "--device", "cpu"])


def test_rows_with_positions_are_renumbered_and_reordered(tmp_path):
    """A command that writes rows as they finish (any order) with their chunk-file `index`/`line`: the part lines
    carry the whole input's positions, in record order; rows without positions are kept as they are."""
    from prmkern.distributed.data_parallel import _to_global, read_records
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"a": 1}\n\n{"a": 2}\nnot json\n{"a": 3, "id": "z"}\n')
    records = read_records(str(inp))
    assert [r.line for r in records] == [1, 3, 4, 5] and records[2].text == "not json"
    chunk = [1, 2, 3]  # the chunk file holds records 1, 2, 3 on its lines 1, 2, 3 (indices 0, 1, 2)
    written = [json.dumps({"index": 1, "line": 2, "error": "malformed"}), json.dumps({"index": 0, "line": 1}),
               json.dumps({"index": 2, "line": 3, "id": "z"})]
    assert [json.loads(x) for x in _to_global(written, chunk, records)] == [
        {"index": 1, "line": 3}, {"index": 2, "line": 4, "error": "malformed"}, {"index": 3, "line": 5, "id": "z"}]
    plain = [json.dumps({"id": 1}), json.dumps({"id": 2})]
    assert _to_global(plain, [1, 2], records) == plain
