"""Data-parallel jobs under torchrun: `torchrun --nproc-per-node N -m prmkern generate|verify IN -o OUT ...`.

Each rank runs its own engine over its share of the input records and the ranks' results are merged, in input
order, into the one file the single-process command writes. The command itself is used as a black box: a rank
hands it a chunk of records (a small JSONL file) and collects the lines it writes, one per record in input order
(the contract of `generate` and `verify`). So a rank loses at most the chunk in flight.

Layout next to the output: `OUT.parts/rank{r}-of{W}.jsonl`, one line per finished record
`{"index": i, "line": "<the command's output line>"}`, appended as chunks finish. A restart, with any world size,
first collects every index already present in any part file (rank 0 reads, then broadcasts: every rank sees the
same set), splits the remaining indices round-robin over the new ranks, and continues. When every rank is done,
rank 0 writes OUT (atomically) from the parts in input order and removes the parts. A rank whose command raised
records its error and unfinished indices in `rank{r}-of{W}.failed.json`; rank 0 then reports those records and
keeps OUT unwritten (exit 1), the other ranks' records stay in the parts, and rerunning the same command finishes
the job. A rank killed outright is handled by torchrun (it stops the job); the rerun resumes in the same way.

Coordination is a gloo process group in the caller's process (torchrun's env:// rendezvous), so it works on CPUs
and beside GPU engines; a tensor-parallel engine inside a rank keeps its own ranks out of this group.
Sampled outputs are valid but equal the single-process ones only where sampling does not depend on a record's
position in an engine batch (greedy: byte-identical).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, Callable

SUPPORTED = ("generate", "verify")
CHUNK_ENV = "PRMKERN_DP_CHUNK"  # records per chunk (default 16)
TIMEOUT_ENV = "PRMKERN_DP_TIMEOUT_S"  # how long ranks wait for each other at the end (default 7 days)
FAULT_ENV = "PRMKERN_DP_FAULT"  # tests: "RANK:CHUNKS[:raise]" kills (or raises in) rank RANK after CHUNKS chunks


def active() -> bool:
    """True under torchrun (or any launcher that sets the env:// rendezvous variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Record:
    line: int  # 1-based line in the input (a JSON array's element index + 1), as the single-process run counts
    text: str  # the record as the command reads it: the input line itself, malformed or not


def read_records(path: str) -> list[Record]:
    """The records of a JSONL file (blank lines skipped) or a JSON array file, unparsed: the command checks them,
    so a bad record fails alone exactly as it does in one process."""
    if path in (None, "-"):
        raise SystemExit("data-parallel runs read an input file; stdin and default inputs are not sharded")
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [Record(i + 1, json.dumps(r)) for i, r in enumerate(json.loads(text))]
    return [Record(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _with_id(rec: Record, index: int) -> str:
    """The record's line, given the id the single-process run would give it (its index) when it has none."""
    try:
        obj = json.loads(rec.text)
    except ValueError:
        return rec.text
    if not isinstance(obj, dict) or "id" in obj:
        return rec.text
    return json.dumps({"id": index, **obj})


def parts_dir(output: str) -> str:
    return output + ".parts"


def finished(parts: str) -> dict[int, str]:
    """{index: output line} over every part file in `parts` (any world size); a partial last line is ignored."""
    done: dict[int, str] = {}
    if not os.path.isdir(parts):
        return done
    for name in sorted(os.listdir(parts)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(parts, name)) as f:
            data = f.read()
        for line in data[:data.rfind("\n") + 1].splitlines():
            if line.strip():
                row = json.loads(line)
                done[int(row["index"])] = row["line"]
    return done


def shard(pending: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of the pending indices: round-robin, so long and short records spread evenly."""
    return pending[rank::world]


def merge(output: str, total: int, done: dict[int, str]) -> None:
    """Writes the output lines of records 0..total-1 in input order to `output`, atomically."""
    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".merge-")
    with os.fdopen(fd, "w") as f:
        for i in range(total):
            f.write(done[i] + "\n")
    os.replace(tmp, output)


def _run_chunk(args: argparse.Namespace, command: Callable[[argparse.Namespace], int], records: list[Record],
               chunk: list[int], work: str) -> list[str]:
    """The command's output lines for records `chunk` (one per record, in order), run on a JSONL of just those."""
    chunk_in, chunk_out = os.path.join(work, "in.jsonl"), os.path.join(work, "out.jsonl")
    with open(chunk_in, "w") as f:
        f.write("".join(_with_id(records[i], i) + "\n" for i in chunk))
    sub = argparse.Namespace(**{**vars(args), "input": chunk_in, "output": chunk_out})
    for name, value in (("limit", None), ("resume", False)):  # the limit applies to the whole input, done already
        if hasattr(sub, name):
            setattr(sub, name, value)
    code = command(sub)
    if code not in (0, None):
        raise RuntimeError(f"`prmkern {args.command}` exited with {code} on records {chunk[:5]}")
    with open(chunk_out) as f:
        lines = f.read().split("\n")  # "\n" only: JSON lines never hold a raw newline, other breaks are data
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(chunk):
        raise RuntimeError(f"`prmkern {args.command}` wrote {len(lines)} lines for {len(chunk)} records")
    return _to_global(lines, chunk, records)


def _to_global(lines: list[str], chunk: list[int], records: list[Record]) -> list[str]:
    """Output lines in the chunk's record order, with the input position fields of rows that carry them
    (`index`, `line`: a command that writes rows as they finish, in any order) rewritten from the chunk file's
    numbering to the whole input's. Rows without them are taken to be in record order."""
    rows = [json.loads(line) for line in lines]
    if not all(isinstance(r, dict) and isinstance(r.get("index"), int) for r in rows):
        return lines
    out: list[str | None] = [None] * len(chunk)
    for row in rows:
        local = row["index"]
        if not 0 <= local < len(chunk) or out[local] is not None:
            raise RuntimeError(f"the command wrote row index {local} for a chunk of {len(chunk)} records")
        row["index"] = chunk[local]
        if "line" in row:
            row["line"] = records[chunk[local]].line
        out[local] = json.dumps(row)
    return out  # type: ignore[return-value]


def _run_chunks(args: argparse.Namespace, command: Callable[[argparse.Namespace], int], records: list[Record],
                mine: list[int], part_path: str, rank: int) -> None:
    """Runs the command over this rank's records chunk by chunk, appending each chunk's lines to the part file."""
    size = max(1, int(os.environ.get(CHUNK_ENV, "16")))
    fault = os.environ.get(FAULT_ENV)
    fault_rank, fault_chunks, fault_kind = (fault.split(":") + ["kill"])[:3] if fault else ("-1", "0", "")
    if os.path.exists(part_path):  # a line cut short when an earlier run was killed: drop it before appending
        with open(part_path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    work = tempfile.mkdtemp(prefix=f"prmkern-dp{rank}-")
    try:
        for c, start in enumerate(range(0, len(mine), size)):
            chunk = mine[start:start + size]
            lines = _run_chunk(args, command, records, chunk, work)
            with open(part_path, "a") as f:
                f.write("".join(json.dumps({"index": i, "line": line}) + "\n" for i, line in zip(chunk, lines)))
                f.flush()
                os.fsync(f.fileno())
            if rank == int(fault_rank) and c + 1 >= int(fault_chunks):
                if fault_kind == "raise":
                    raise RuntimeError(f"injected fault on rank {rank} after {c + 1} chunks")
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reuse_engine(cli) -> Callable[[], None]:
    """Chunks of one rank share one LLM: wraps the cli's engine factory in a cache; returns the undo."""
    names = [n for n in ("_make_llm", "make_llm") if hasattr(cli, n)]
    saved = {n: getattr(cli, n) for n in names}
    cache: dict[str, Any] = {}

    def cached(factory):
        def make(args: argparse.Namespace, *a, **kw):
            key = repr(sorted((k, repr(v)) for k, v in vars(args).items()
                              if k not in ("input", "output", "limit", "func"))) + repr((a, kw))
            if key not in cache:
                cache[key] = factory(args, *a, **kw)
            return cache[key]
        return make

    for n in names:
        setattr(cli, n, cached(saved[n]))

    def undo() -> None:
        for n, f in saved.items():
            setattr(cli, n, f)
        for llm in cache.values():
            close = getattr(llm, "close", None)
            if close is not None:
                close()
    return undo


def run(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """The data-parallel form of `command` (a cli command function taking parsed args), run on every rank."""
    import torch.distributed as dist

    from prmkern import cli

    if args.command not in SUPPORTED:
        raise SystemExit(f"`prmkern {args.command}` does not run data-parallel; supported: {', '.join(SUPPORTED)}")
    output = getattr(args, "output", "-")
    if output in (None, "-"):
        raise SystemExit("data-parallel runs need -o FILE: the ranks' parts are kept beside it until merged")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    records = read_records(args.input)
    if getattr(args, "limit", None):
        records = records[:args.limit]
    if getattr(args, "device", None) in (None, "cuda"):
        import torch
        if torch.cuda.is_available():  # one GPU per rank (T consecutive GPUs with tensor parallelism inside)
            local = int(os.environ.get("LOCAL_RANK", rank))
            args.device = f"cuda:{local * (getattr(args, 'tensor_parallel_size', 1) or 1)}"
    parts = parts_dir(output)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 7 * 86400)))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        plan: list[Any] = [None]
        if rank == 0:
            os.makedirs(parts, exist_ok=True)
            for name in os.listdir(parts):  # failures of an earlier run are being retried now
                if name.endswith(".failed.json"):
                    os.remove(os.path.join(parts, name))
            done = finished(parts)
            pending = [i for i in range(len(records)) if i not in done]
            plan = [pending]
            if done:
                print(f"resuming: {len(done)} of {len(records)} records done in {parts}, {len(pending)} left over "
                      f"{world} ranks", file=sys.stderr)
        dist.broadcast_object_list(plan, src=0)
        mine = shard(plan[0], rank, world)
        part_path = os.path.join(parts, f"rank{rank}-of{world}.jsonl")
        undo = _reuse_engine(cli)
        error = None
        try:
            _run_chunks(args, command, records, mine, part_path, rank)
        except Exception as e:  # noqa: BLE001 - reported per rank below; the other ranks' records are kept
            error = f"{type(e).__name__}: {e}"
            left = sorted(set(mine) - set(finished(parts)))
            with open(os.path.join(parts, f"rank{rank}-of{world}.failed.json"), "w") as f:
                json.dump({"rank": rank, "error": error, "records": left}, f)
            print(f"rank {rank} failed: {error}", file=sys.stderr)
        finally:
            undo()
        dist.barrier()
        if rank != 0:
            return 1 if error else 0
        return _finish(output, parts, len(records), world)
    finally:
        dist.destroy_process_group()


def _finish(output: str, parts: str, total: int, world: int) -> int:
    done = finished(parts)
    missing = [i for i in range(total) if i not in done]
    failures = []
    for name in sorted(os.listdir(parts)):
        if name.endswith(".failed.json"):
            with open(os.path.join(parts, name)) as f:
                failures.append(json.load(f))
    if missing:
        for fail in failures:
            recs = fail["records"]
            print(f"rank {fail['rank']} failed on {len(recs)} records (indices {recs[:20]}"
                  f"{' ...' if len(recs) > 20 else ''}): {fail['error']}", file=sys.stderr)
        print(f"{len(missing)} of {total} records are not done; the {len(done)} finished are kept in {parts}. "
              f"Rerun the same command (any number of ranks) to finish; {output} is written when all are done.",
              file=sys.stderr)
        return 1
    merge(output, total, done)
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))
    os.rmdir(parts)
    print(f"merged {total} records from {world} ranks into {output}", file=sys.stderr)
    return 0

