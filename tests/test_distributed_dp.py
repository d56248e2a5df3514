"""Data-parallel jobs under torchrun on the CPU (gloo), the job runner's data-parallel mode (prmkern/cli/shards.py):
2 ranks write the same bytes as one process, greedy and sampled, for generate, verify, eval processbench and bon,
also with a tensor-parallel engine in each rank; a rank that raises has its records reported and the others kept,
a killed rank loses only its batch in flight, and the job resumes with a different number of ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from prmkern.cli import entry as cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), "-m", "prmkern", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _parts_records(output: str) -> int:
    parts = output + ".parts"
    return sum(len(json.loads(line)["indices"]) for name in os.listdir(parts) if name.endswith(".jsonl")
               for line in open(os.path.join(parts, name)) if line.strip())


def _single(argv: list[str]) -> int:
    """The single-process reference, with the ranks' thread count (given in argv as --threads 1): a matmul's
    float sums depend on how many threads split it, so floats match across processes only at equal counts."""
    threads = torch.get_num_threads()
    try:
        return cli.main(argv)
    finally:
        torch.set_num_threads(threads)


def _write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_dp_generate_two_ranks_with_tp2_engines_equals_one_process(tmp_path, qwen2_dir):
    """2 data-parallel ranks, each hosting a 2-rank tensor-parallel engine (its ranks outside torchrun's group)."""
    records = [{"prompt_token_ids": [5 + i, 7, 11 + 3 * i, 2][: 2 + i % 3], "max_tokens": 3 + i % 4} for i in range(5)]
    records[2]["id"] = "named"
    records[3] = {"prompt_token_ids": [1, 600], "max_tokens": 3}  # out of vocabulary: fails alone, in its place
    lines = [json.dumps(r) for r in records] + ["[1, 2]"]  # not an object: rejected, written first as in one process
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    args = ["generate", inp, "--model", qwen2_dir, "--device", "cpu", "--temperature", "0", "--no-progress",
            "--batch-size", "2", "--threads", "1"]
    single, multi = str(tmp_path / "single.jsonl"), str(tmp_path / "dp.jsonl")
    assert _single(args + ["-o", single]) == 0
    run = torchrun(2, args + ["-o", multi, "--tensor-parallel-size", "2"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert open(multi, "rb").read() == open(single, "rb").read()
    rows = [json.loads(x) for x in open(multi).read().splitlines()]
    # rows in input order (#26): the engine-failed record 3 and the rejected record 5 in their places
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 5] and "error" in rows[3] and "error" in rows[5]
    assert not os.path.exists(multi + ".parts")


def test_dp_verify_failed_rank_reported_killed_rank_resumed(tmp_path, qwen2_dir):
    """Batches of 2 records over 2 ranks: each record is scored in the same engine batch as in one process, so the
    floats (scores) are the same bytes, through a failed rank, a killed rank and a resume with one rank."""
    records = [{"problem": f"What is {i} + {i + 1}?", "steps": [f"We add {i} and {i + 1}.", f"It is {2 * i + 1}."],
                "label": -1} for i in range(12)]
    records[4]["id"] = "p-4"
    lines = [json.dumps(r) for r in records]
    lines[7] = '{"problem": "cut short'  # malformed: fails alone
    lines[9] = json.dumps({"problem": "no steps"})  # fails the command's check
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    args = ["verify", inp, "--model", qwen2_dir, "--device", "cpu", "--temperature", "0", "--chains", "2",
            "--max-tokens", "6", "--no-progress", "--batch-size", "2", "--threads", "1"]
    single, multi = str(tmp_path / "single.jsonl"), str(tmp_path / "dp.jsonl")
    assert _single(args + ["-o", single, "--summary", str(tmp_path / "single.json")]) == 0
    # 1. batches {0,1} {4,5} {8,9} on rank 0, {2,3} {6,7} {10,11} on rank 1, which raises after its first batch
    run = torchrun(2, args + ["-o", multi], PRMKERN_DP_FAULT="1:1:raise")
    assert run.returncode != 0
    assert "rank 1 failed on 4 records (indices [6, 7, 10, 11])" in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(multi) and _parts_records(multi) == 8
    # 2. 2 ranks over the 2 batches left; rank 1 is killed (SIGKILL) after its batch: torchrun stops the job
    run = torchrun(2, args + ["-o", multi], PRMKERN_DP_FAULT="1:1")
    assert run.returncode != 0 and "resuming: 8 of 12 records done" in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(multi) and _parts_records(multi) >= 10
    # 3. one rank finishes the job: the merged file is what one process writes, and so is the summary's account
    run = torchrun(1, args + ["-o", multi, "--summary", str(tmp_path / "dp.json")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert open(multi, "rb").read() == open(single, "rb").read()
    assert not os.path.exists(multi + ".parts")
    one, dp = (json.load(open(tmp_path / f"{n}.json")) for n in ("single", "dp"))
    for key in ("records", "succeeded", "failed", "failures_by_reason", "failures"):
        assert dp[key] == one[key], key
    assert dp["failed"] == 2 and dp["data_parallel_ranks"] == 1


def test_dp_refuses_stdout(monkeypatch, tmp_path, qwen2_dir):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    inp = _write(tmp_path / "in.jsonl", [{"prompt_token_ids": [1, 2]}])
    with pytest.raises(SystemExit, match="need -o FILE"):
        cli.main(["generate", inp, "--model", qwen2_dir, "--device", "cpu"])


def test_sampled_rows_of_every_job_command_equal_one_process(tmp_path, qwen2_dir):
    """Sampling (temperature 1) with seeds: each rank runs the single-process batches with their global indices,
    so verify's per-batch seeds, generate's request seeds and bon's are the same, and so are the bytes."""
    records = [{"problem": f"What is {i} + {i + 1}?", "steps": [f"We add {i} and {i + 1}.", f"It is {2 * i + 1}."],
                "label": -1 if i % 2 else 1, "answer": str(2 * i + 1)} for i in range(5)]
    inp = _write(tmp_path / "in.jsonl", records)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt_token_ids": [3 + i, 9, 4], "max_tokens": 4 + i % 3}
                                                  for i in range(5)])
    engine = ["--model", qwen2_dir, "--device", "cpu", "--no-progress", "--batch-size", "2", "--threads", "1"]
    verifier = ["--temperature", "1.0", "--chains", "2", "--max-tokens", "6"]
    commands = {"generate": ["generate", prompts, "--temperature", "1.0", "--sampling-seed", "7", *engine],
                "verify": ["verify", inp, *verifier, *engine],
                "eval": ["eval", "processbench", inp, *verifier, *engine],
                # bon's default N (8): torchrun's own parser refuses `--n` as an ambiguous abbreviation of its options
                "bon": ["bon", inp, "--gen-max-tokens", "4", *verifier, *engine]}
    for name, argv in commands.items():
        single, multi = str(tmp_path / f"{name}-1.jsonl"), str(tmp_path / f"{name}-dp.jsonl")
        assert _single(argv + ["-o", single]) == 0, name
        run = torchrun(2, argv + ["-o", multi])
        assert run.returncode == 0, (name, run.stderr[-3000:])
        assert open(multi, "rb").read() == open(single, "rb").read(), name
        assert len(open(single).read().splitlines()) == 5 and not os.path.exists(multi + ".parts"), name


def test_sharded_runner_in_one_process_writes_the_single_process_bytes(tmp_path, monkeypatch):
    """The data-parallel JobRunner at world size 1 (a gloo group in this process), without an engine: the merged
    file is byte for byte the file of the plain JobRunner over the same items and batches (input order);
    the parts are gone and the summary counts every record."""
    from prmkern.cli.jobs import JobRunner, read_items
    from prmkern.cli.shards import Shard
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"a": 1}\r\n\n{"a": "x\u2028y"}\x0c{"b": 2}\r{"c": NaN}\n  \nnot json\n{"a": 5}\n', newline="")

    def process(batch, emit):
        for it in reversed(batch):  # rows emitted out of order inside a batch
            emit(it.index, it.row(value=sorted(it.record), batch=[x.index for x in batch]))

    def run(output: str, shard) -> JobRunner:
        runner = JobRunner(output, shard=shard)
        runner.run(read_items(str(inp)), process, batch_size=2, align=True)
        return runner
    plain = run(str(tmp_path / "plain.jsonl"), None)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    sharded = run(str(tmp_path / "dp.jsonl"), Shard(0, 1))
    assert (tmp_path / "dp.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    assert [r["index"] for r in sharded.rows] == [r["index"] for r in plain.rows]
    assert not (tmp_path / "dp.jsonl.parts").exists()
    summary = sharded.summary(len(sharded.rows), {"generated_tokens": 1})
    assert summary["failed"] == plain.summary(len(plain.rows), None)["failed"] >= 2
    assert summary["data_parallel_ranks"] == 1 and "engine" not in summary
