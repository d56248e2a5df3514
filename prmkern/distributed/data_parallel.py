"""Data-parallel jobs under torchrun: `torchrun --nproc-per-node N -m prmkern generate|verify IN -o OUT ...`.

Each rank runs its own engine over its share of the input records and the ranks' results are merged into the one
file the single-process command writes. The command itself is used as a black box: a rank hands it one of the
single-process run's engine batches at a time (records index // B == g, B the command's batch size, as a small
JSONL file) and collects the lines it writes. Running the same batches is what makes the output the same bytes:
a record's floats (scores, log-probabilities) depend on what shares its engine steps. A rank loses at most the
batch in flight.

Layout next to the output: `OUT.parts/rank{r}-of{W}.jsonl`, one line per finished batch
`{"indices": [...], "lines": [<the command's output lines>], "bad": [records rejected before the engine]}`. A
restart, with any world size, collects the batches already present in any part file (rank 0 reads, then
broadcasts), splits the remaining batches round-robin over the new ranks, and continues. When every rank is done,
rank 0 writes OUT (atomically) in the single-process order (rejected records first, then input order), writes the
--summary, and removes the parts. A rank whose command raised records its error and unfinished indices in
`rank{r}-of{W}.failed.json`; rank 0 then reports those records and keeps OUT unwritten (exit 1), the other ranks'
records stay in the parts, and rerunning the same command finishes the job. A rank killed outright is handled by
torchrun (it stops the job); the rerun resumes in the same way.

Coordination is a gloo process group in the caller's process (torchrun's env:// rendezvous), so it works on CPUs
and beside GPU engines; a tensor-parallel engine inside a rank keeps its own ranks out of this group.
Greedy outputs are byte-identical to one process; sampled ones are valid samples but not the single-process ones
(verify derives a batch's seed from its number in the file the command reads, here always batch 0).
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
    so a bad record fails alone exactly as it does in one process. Lines are split as jobs.read_items splits them
    (str.splitlines), so record i here is record i there."""
    if path in (None, "-"):
        raise SystemExit("data-parallel runs read an input file; stdin and default inputs are not sharded")
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [Record(i + 1, json.dumps(r)) for i, r in enumerate(json.loads(text))]
    return [Record(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def batch_size(args: argparse.Namespace) -> int:
    """Records per engine batch of the single-process command (its JobRunner's aligned batches: index // size).
    A rank runs whole batches, so each record is computed in the same engine batch as in one process: the
    floats of a row (scores, log-probabilities) depend on what shares its engine steps."""
    if args.command == "verify":  # cli_commands._verify_job's rule
        from prmkern.cli.verify import build_config
        return max(1, args.batch_size or 64 // build_config(args).num_chains)
    return max(1, args.batch_size or 1)


def groups(total: int, size: int) -> list[list[int]]:
    """The record indices of each batch: [0, size), [size, 2 size), ..."""
    return [list(range(s, min(s + size, total))) for s in range(0, total, size)]


def parts_dir(output: str) -> str:
    return output + ".parts"


def finished(parts: str) -> tuple[dict[int, str], set[int]]:
    """({index: output line}, indices of records the command rejected before any batch) over every part file in
    `parts` (any world size). A part line holds one whole batch; a partial last line (a write cut short) is
    ignored, so a batch is either done entirely or redone entirely."""
    done: dict[int, str] = {}
    bad: set[int] = set()
    if not os.path.isdir(parts):
        return done, bad
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
    return done, bad


def shard(pending: list, rank: int, world: int) -> list:
    """This rank's share of the pending batches: round-robin, so long and short records spread evenly."""
    return pending[rank::world]


def merge(output: str, total: int, done: dict[int, str], bad: set[int]) -> None:
    """Writes the output lines to `output`, atomically, in the single-process order: the records rejected before
    any batch first (the JobRunner writes them at once), then the others, in input order."""
    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".merge-")
    order = sorted(bad) + [i for i in range(total) if i not in bad]
    with os.fdopen(fd, "w") as f:
        for i in order:
            f.write(done[i] + "\n")
    os.replace(tmp, output)


def _observe_rejected(jobs) -> tuple[list[list[int]], Callable[[], None]]:
    """Wraps JobRunner.run to record, per call, the indices of the rows written before the first batch (the
    records rejected by reading or by the command's checks); returns that list and the undo."""
    original = jobs.JobRunner.run
    seen: list[list[int]] = []

    def run(self, items, process, *a, **kw):
        first: list[int] = []

        def observed(batch, emit):
            if not first:
                first.append(len(self.rows))
            return process(batch, emit)
        try:
            return original(self, items, observed, *a, **kw)
        finally:
            n = first[0] if first else len(self.rows)
            seen.append([int(r["index"]) for r in self.rows[:n]])
    jobs.JobRunner.run = run

    def undo() -> None:
        jobs.JobRunner.run = original
    return seen, undo


def _run_chunk(args: argparse.Namespace, command: Callable[[argparse.Namespace], int], records: list[Record],
               chunk: list[int], work: str, rejected: list[list[int]]) -> tuple[list[str], list[int]]:
    """The command's output lines for records `chunk` (one batch: one per record, in order), run on a JSONL of
    just those, and the indices of the records it rejected before the batch."""
    chunk_in, chunk_out = os.path.join(work, "in.jsonl"), os.path.join(work, "out.jsonl")
    with open(chunk_in, "w") as f:
        f.write("".join(records[i].text + "\n" for i in chunk))
    sub = argparse.Namespace(**{**vars(args), "input": chunk_in, "output": chunk_out})
    # the limit applied to the whole input already; parts are the resume state; rank 0 writes the summary
    for name, value in (("limit", None), ("resume", False), ("summary", None)):
        if hasattr(sub, name):
            setattr(sub, name, value)
    rejected.clear()
    code = command(sub)
    if code not in (0, None):
        raise RuntimeError(f"`prmkern {args.command}` exited with {code} on records {chunk[:5]}")
    with open(chunk_out) as f:
        lines = f.read().split("\n")  # "\n" only: JSON lines never hold a raw newline, other breaks are data
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(chunk):
        raise RuntimeError(f"`prmkern {args.command}` wrote {len(lines)} lines for {len(chunk)} records")
    bad = [chunk[i] for i in (rejected[0] if rejected else [])]
    return _to_global(lines, chunk, records), bad


def _own_id(text: str) -> bool:
    from prmkern.cli.jobs import _parse_line
    rec, _ = _parse_line(text)
    return isinstance(rec, dict) and "id" in rec


def _to_global(lines: list[str], chunk: list[int], records: list[Record]) -> list[str]:
    """Output lines in the chunk's record order, with the input position fields of rows that carry them
    (`index`, `line`, and `id` where it is the index: a record without its own id) rewritten from the chunk
    file's numbering to the whole input's. Rows without an index are taken to be in record order."""
    rows = [json.loads(line) for line in lines]
    if not all(isinstance(r, dict) and isinstance(r.get("index"), int) for r in rows):
        return lines
    out: list[str | None] = [None] * len(chunk)
    for row in rows:
        local = row["index"]
        if not 0 <= local < len(chunk) or out[local] is not None:
            raise RuntimeError(f"the command wrote row index {local} for a chunk of {len(chunk)} records")
        rec = records[chunk[local]]
        row["index"] = chunk[local]
        if "line" in row:
            row["line"] = rec.line
        if "id" in row and not _own_id(rec.text):
            row["id"] = chunk[local]
        out[local] = json.dumps(row)
    return out  # type: ignore[return-value]


def _run_chunks(args: argparse.Namespace, command: Callable[[argparse.Namespace], int], records: list[Record],
                mine: list[list[int]], part_path: str, rank: int) -> None:
    """Runs the command over this rank's batches, one chunk per batch, appending each as one part line."""
    from prmkern.cli import jobs
    fault = os.environ.get(FAULT_ENV)
    fault_rank, fault_chunks, fault_kind = (fault.split(":") + ["kill"])[:3] if fault else ("-1", "0", "")
    if os.path.exists(part_path):  # a line cut short when an earlier run was killed: drop it before appending
        with open(part_path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    work = tempfile.mkdtemp(prefix=f"prmkern-dp{rank}-")
    rejected, undo = _observe_rejected(jobs)
    try:
        for c, chunk in enumerate(mine):
            lines, bad = _run_chunk(args, command, records, chunk, work, rejected)
            with open(part_path, "a") as f:
                f.write(json.dumps({"indices": chunk, "lines": lines, "bad": bad}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if rank == int(fault_rank) and c + 1 >= int(fault_chunks):
                if fault_kind == "raise":
                    raise RuntimeError(f"injected fault on rank {rank} after {c + 1} chunks")
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        undo()
        shutil.rmtree(work, ignore_errors=True)


def _reuse_engine(*modules) -> Callable[[], None]:
    """Chunks of one rank share one LLM: wraps the engine factory of each module (cli, and cli_commands, which
    imported it by name) in one cache; returns the undo."""
    saved = [(m, n, getattr(m, n)) for m in modules for n in ("_make_llm", "make_llm") if hasattr(m, n)]
    cache: dict[str, Any] = {}

    def cached(factory):
        def make(args: argparse.Namespace, *a, **kw):
            key = repr(sorted((k, repr(v)) for k, v in vars(args).items()
                              if k not in ("input", "output", "limit", "func"))) + repr((a, kw))
            if key not in cache:
                cache[key] = factory(args, *a, **kw)
            return cache[key]
        return make

    for m, n, f in saved:
        setattr(m, n, cached(f))

    def undo() -> None:
        for m, n, f in saved:
            setattr(m, n, f)
        for llm in cache.values():
            close = getattr(llm, "close", None)
            if close is not None:
                close()
    return undo


def run(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """The data-parallel form of `command` (a cli command function taking parsed args), run on every rank."""
    import time

    import torch.distributed as dist

    from prmkern.cli import entry as cli

    if args.command not in SUPPORTED:
        raise SystemExit(f"`prmkern {args.command}` does not run data-parallel; supported: {', '.join(SUPPORTED)}")
    output = getattr(args, "output", "-")
    if output in (None, "-"):
        raise SystemExit("data-parallel runs need -o FILE: the ranks' parts are kept beside it until merged")
    cli.check_engine_args(args)  # a bad option: UsageError (exit 2) on every rank, before any rendezvous
    size = batch_size(args)  # verify: builds (checks) the verifier's configuration
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
    start = time.perf_counter()
    dist.init_process_group("gloo", timeout=timeout)
    try:
        plan: list[Any] = [None]
        if rank == 0:
            os.makedirs(parts, exist_ok=True)
            for name in os.listdir(parts):  # failures of an earlier run are being retried now
                if name.endswith(".failed.json"):
                    os.remove(os.path.join(parts, name))
            done, _ = finished(parts)
            pending = [g for g in groups(len(records), size) if any(i not in done for i in g)]
            plan = [pending]
            if done:
                left = sum(len(g) for g in pending)
                print(f"resuming: {len(records) - left} of {len(records)} records done in {parts}, {left} left "
                      f"over {world} ranks", file=sys.stderr)
        dist.broadcast_object_list(plan, src=0)
        mine = shard(plan[0], rank, world)
        part_path = os.path.join(parts, f"rank{rank}-of{world}.jsonl")
        from prmkern.cli import commands as cli_commands
        undo = _reuse_engine(cli, cli_commands)
        error = None
        try:
            _run_chunks(args, command, records, mine, part_path, rank)
        except Exception as e:  # noqa: BLE001 - reported per rank below; the other ranks' records are kept
            error = f"{type(e).__name__}: {e}"
            done, _ = finished(parts)
            left = sorted(i for g in mine for i in g if i not in done)
            with open(os.path.join(parts, f"rank{rank}-of{world}.failed.json"), "w") as f:
                json.dump({"rank": rank, "error": error, "records": left}, f)
            print(f"rank {rank} failed: {error}", file=sys.stderr)
        finally:
            undo()
        dist.barrier()
        if rank != 0:
            return 1 if error else 0
        return _finish(args, output, parts, len(records), world, time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def _finish(args: argparse.Namespace, output: str, parts: str, total: int, world: int, seconds: float) -> int:
    done, bad = finished(parts)
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
    merge(output, total, done, bad)
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))
    os.rmdir(parts)
    if getattr(args, "summary", None):
        _write_summary(args, output, total, world, seconds)
    print(f"merged {total} records from {world} ranks into {output}", file=sys.stderr)
    return 0


def _write_summary(args: argparse.Namespace, output: str, total: int, world: int, seconds: float) -> None:
    """--summary of the whole job, from the merged file (counts and failures as one process reports them; the
    engine counters are per rank and are not summed here)."""
    from prmkern.cli.jobs import JobRunner, write_summary
    runner = JobRunner(output)
    with open(output) as f:
        runner.rows = [json.loads(line) for line in f if line.strip()]
    runner.seconds = seconds
    write_summary(args.summary, runner.summary(total, None, command=args.command, input=args.input, output=output,
                                               data_parallel_ranks=world))
