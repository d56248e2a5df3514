"""The data-parallel mode of the job runner: under torchrun every rank runs its share of a job's batches.

`torchrun --nproc-per-node N -m prmkern generate|verify|eval|bon ... -o OUT`: every rank reads the whole input,
checks it and loads its own engine as one process would, then the JobRunner (jobs.py) splits the job's batches
(records with equal index // batch size, global indices) round-robin over the ranks. A rank runs its batches
exactly as one process runs them, so each row is computed in the same engine batch, with the same seeds (verify
seeds a batch by its number), and is the same bytes. This file holds the parts of that mode that know nothing of
records: the rendezvous, the part files, the plan and the merge.

Layout next to the output: `OUT.parts/rank{r}-of{W}.jsonl`, one line per finished batch
`{"indices": [...], "lines": [<its output rows>], "bad": [records rejected before the engine]}`, in the order
the rows were emitted. A restart, with
any world size, collects the batches already present in any part file (rank 0 reads, then broadcasts), splits the
remaining batches over the new ranks, and continues. When every rank is done, rank 0 writes OUT (atomically) in
the single-process order (input order) and removes the parts. A rank that raised
records its error and unfinished indices in `rank{r}-of{W}.failed.json`; rank 0 then reports those records and
keeps OUT unwritten (exit 1); rerunning the same command finishes the job. A rank killed outright is handled by
torchrun (it stops the job); the rerun resumes in the same way. Coordination is a gloo process group in the
caller's process (torchrun's env:// rendezvous), so it works on CPUs and beside GPU engines; a tensor-parallel
engine inside a rank keeps its own ranks out of this group.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

TIMEOUT_ENV = "PRMKERN_DP_TIMEOUT_S"  # how long ranks wait for each other at the end (default 7 days)
FAULT_ENV = "PRMKERN_DP_FAULT"  # tests: "RANK:BATCHES[:raise]" kills (or raises in) rank RANK after BATCHES batches
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Shard | None":
        """This process's place under torchrun (or any launcher that sets the env:// variables), else None."""
        if not all(k in os.environ for k in _RENDEZVOUS):
            return None
        rank = int(os.environ["RANK"])
        return cls(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))


def check_job(output: str, input_path: str | None) -> None:
    """What a data-parallel job needs, checked before any model loads: a file to merge into, an input every rank
    can read (not stdin)."""
    if output in (None, "-"):
        raise SystemExit("data-parallel runs need -o FILE: the ranks' parts are kept beside it until merged")
    if input_path == "-":
        raise SystemExit("data-parallel runs read an input file; stdin is not sharded")


def connect() -> None:
    """Joins torchrun's process group (gloo), once per process."""
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 7 * 86400)))
        dist.init_process_group("gloo", timeout=timeout)


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parts_dir(output: str) -> str:
    return output + ".parts"


def finished(parts: str) -> tuple[dict[int, str], set[int], list[list[int]]]:
    """({index: output line}, indices of records rejected before the engine, each batch's indices in the order
    its rows were written) over every part file in `parts` (any world size). A part line holds one whole batch; a
    partial last line (a write cut short) is ignored, so a batch is either done entirely or redone entirely."""
    done: dict[int, str] = {}
    bad: set[int] = set()
    batches: list[list[int]] = []
    if not os.path.isdir(parts):
        return done, bad, batches
    for name in sorted(os.listdir(parts)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(parts, name)) as f:
            data = f.read()
        for line in data[:data.rfind("\n") + 1].splitlines():
            if line.strip():
                row = json.loads(line)
                done.update(zip(row["indices"], row["lines"]))
                bad.update(row["bad"])
                batches.append(row["indices"])
    return done, bad, batches


def plan(shard: Shard, parts: str, batches: list[list[int]]) -> list[int]:
    """The positions (in `batches`) of this rank's batches: rank 0 finds the batches not done in any part file
    and broadcasts them; they are dealt round-robin, so long and short records spread evenly."""
    pending: list[Any] = [None]
    if shard.rank == 0:
        os.makedirs(parts, exist_ok=True)
        for name in os.listdir(parts):  # failures of an earlier run are being retried now
            if name.endswith(".failed.json"):
                os.remove(os.path.join(parts, name))
        done, _, _ = finished(parts)
        pending = [[b for b, batch in enumerate(batches) if any(i not in done for i in batch)]]
        if done:
            total = sum(len(b) for b in batches)
            left = sum(len(batches[b]) for b in pending[0])
            print(f"resuming: {total - left} of {total} records done in {parts}, {left} left over {shard.world} "
                  f"ranks", file=sys.stderr)
    dist.broadcast_object_list(pending, src=0)
    return pending[0][shard.rank::shard.world]


def open_part(shard: Shard, parts: str) -> str:
    """This rank's part file; a line cut short when an earlier run was killed is dropped before appending."""
    path = os.path.join(parts, f"rank{shard.rank}-of{shard.world}.jsonl")
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    return path


def append_batch(path: str, indices: list[int], lines: list[str], bad: list[int]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"indices": indices, "lines": lines, "bad": bad}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def inject_fault(shard: Shard, batches_done: int) -> None:
    """Tests: PRMKERN_DP_FAULT="RANK:BATCHES[:raise]" kills rank RANK (or raises in it) after BATCHES batches."""
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    rank, count, kind = (fault.split(":") + ["kill"])[:3]
    if shard.rank == int(rank) and batches_done >= int(count):
        if kind == "raise":
            raise RuntimeError(f"injected fault on rank {shard.rank} after {batches_done} batches")
        os.kill(os.getpid(), signal.SIGKILL)


def record_failure(shard: Shard, parts: str, error: str, mine: list[int]) -> None:
    """Writes this rank's error and its records not done, for rank 0 to report."""
    done, _, _ = finished(parts)
    left = sorted(i for i in mine if i not in done)
    with open(os.path.join(parts, f"rank{shard.rank}-of{shard.world}.failed.json"), "w") as f:
        json.dump({"rank": shard.rank, "error": error, "records": left}, f)
    print(f"rank {shard.rank} failed: {error}", file=sys.stderr)


def barrier() -> None:
    dist.barrier()


def merge(output: str, parts: str, total: int) -> list[str] | None:
    """Rank 0, after every rank is done: writes OUT atomically in the single-process order (input order, as the
    JobRunner writes rows), removes the parts and returns the lines; or reports what is missing and returns
    None."""
    done, _, _ = finished(parts)
    missing = [i for i in range(total) if i not in done]
    if missing:
        for name in sorted(os.listdir(parts)):
            if name.endswith(".failed.json"):
                with open(os.path.join(parts, name)) as f:
                    fail = json.load(f)
                recs = fail["records"]
                print(f"rank {fail['rank']} failed on {len(recs)} records (indices {recs[:20]}"
                      f"{' ...' if len(recs) > 20 else ''}): {fail['error']}", file=sys.stderr)
        print(f"{len(missing)} of {total} records are not done; the {len(done)} finished are kept in {parts}. "
              f"Rerun the same command (any number of ranks) to finish; {output} is written when all are done.",
              file=sys.stderr)
        return None
    lines = [done[i] for i in range(total)]  # input order, as the single-process JobRunner writes them
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)), prefix=".merge-")
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, output)
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))
    os.rmdir(parts)
    return lines
