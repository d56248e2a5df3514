"""Resumable JSONL jobs: read records line by line, write each result as it finishes, resume, summarise.

The input is a JSONL file (or a JSON array, as ProcessBench ships). Every line becomes an `Item`: its 0-based
`index` among the non-blank lines, its 1-based `line` number, and the parsed record or the reason it cannot be one
(malformed JSON, bytes that are not UTF-8, nested deeper than the parser's recursion allows, not an object, a
NaN/Infinity constant, a string holding a lone UTF-16 surrogate that no tokenizer can encode). A command checks the
fields it needs; a bad record fails alone: its output row carries `"error"` and its line number, and the summary
counts it by reason. A batch whose processing raises is retried one record at a time, so the record that broke it
fails alone.

`JobRunner.run(items, process)` is the seam: `process(batch, emit)` gets a list of Items and calls
`emit(index, row)` once per item as soon as its result exists; the runner writes that row, flushed, so a crash or
Ctrl-C loses at most the batch in flight. `--resume` reads an existing output, skips the indices it already holds
(a truncated last line is dropped) and appends. Under torchrun the runner is data-parallel (shards.py): each rank
runs its share of the same batches, with their global indices, and rank 0 merges the rows into the file one
process writes; the command around it does not change. The output file is locked (flock, exclusive) from before the
command's model loads (`JobRunner.locked()`) to the end of the run, so a second run on the same output stops at once
instead of loading a model and then failing, or interleaving duplicate rows; an output or summary path that is an
input file (same file after realpath) is refused before anything is written (`check_output_paths`). It does not
load models or know any command's schema.
"""
from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import math
import os
import stat
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, Iterator

from prmkern.cli import shards
from prmkern.engine.engine import FatalEngineError
from prmkern.textcheck import find_lone_surrogate

__all__ = ["Item", "read_items", "JobRunner", "failure_reason", "write_summary", "check_output_paths"]


@dataclass
class Item:
    index: int  # position among the input's records (non-blank lines), 0-based; the resume key
    line: int  # 1-based line number in the input (for a JSON array: the element's index + 1)
    record: Any = None
    error: str | None = None  # why the line is not a usable record (set by reading or by the command's check)
    extra: dict[str, Any] = field(default_factory=dict)  # fields every row of this item carries (e.g. its subset)

    def row(self, **fields: Any) -> dict[str, Any]:
        """An output row's leading fields: where the record came from, then the command's fields."""
        rid = self.record.get("id", self.index) if isinstance(self.record, dict) else self.index
        return {"index": self.index, "line": self.line, "id": rid, **self.extra, **fields}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not accepted)")


_TOO_DEEP = ("malformed JSON: nested too deeply for the parser (arrays/objects inside each other beyond Python's "
             "recursion limit); accepted: records nested a few hundred levels at most")


def _check_record(rec: Any) -> tuple[Any, str | None]:
    if not isinstance(rec, dict):
        return None, f"not a JSON object: got a {type(rec).__name__}"
    found = find_lone_surrogate(rec)
    if found is not None:
        return None, (f"invalid text: {found[0] or 'the record'} holds a lone surrogate {found[1]} (half of a UTF-16 "
                      f"pair); accepted: Unicode text that UTF-8 can encode")
    return rec, None


def _parse_line(text: str) -> tuple[Any, str | None]:
    try:
        rec = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e}"
    except ValueError as e:  # raised by _reject_constant
        return None, str(e)
    except RecursionError:
        return None, _TOO_DEEP
    return _check_record(rec)


def _one_json_value(raw: bytes) -> bool:
    """The line is one whole JSON value (a JSONL record), not the first line of a pretty-printed array."""
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


def read_items(path: str) -> list[Item]:
    """Items of a JSONL file ('-': stdin) or of a JSON array file. Blank lines are skipped, never fatal. Lines are
    split on "\\n" in the bytes (a U+2028 inside a JSON string does not end a record) and decoded one by one, so
    a line that is not UTF-8 fails alone."""
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    array = None
    if data.lstrip().startswith(b"["):
        try:
            array = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            lines = [raw for raw in data.split(b"\n") if raw.strip()]
            if len(lines) < 2 or not _one_json_value(lines[0]):  # else JSONL whose first record is not an object
                why = _TOO_DEEP if isinstance(e, RecursionError) else e  # (say "[1, 2]"): it fails alone, below
                raise SystemExit(f"{path}: starts with '[' but is not a valid JSON array ({why}); give a JSON array "
                                 f"or JSONL (one object per line)")
    if array is not None:
        items = []
        for i, rec in enumerate(array):
            rec, bad = _check_record(rec)
            items.append(Item(i, i + 1, rec, bad))
        return items
    items = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append(Item(len(items), lineno, None, f"malformed JSON: not UTF-8 text (byte "
                                                         f"{raw[e.start:e.start + 1]!r} at column {e.start + 1})"))
            continue
        rec, bad = _parse_line(line)
        items.append(Item(len(items), lineno, rec, bad))
    return items


def check_input_paths(inputs: list[str]) -> None:
    """Refuses (SystemExit, one line naming the path) an input that is missing, a directory or unreadable, before
    anything loads: opening it later gave a traceback. '-' is stdin."""
    for path in inputs:
        if not path or path == "-":
            continue
        if os.path.isdir(path):
            raise SystemExit(f"{path} is a directory; accepted: a JSONL or JSON array file, or - for stdin")
        if not os.path.exists(path):
            raise SystemExit(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise SystemExit(f"{path}: not readable (permission denied)")


def check_output_paths(inputs: list[str], outputs: dict[str, str | None]) -> None:
    """Refuses (SystemExit) an output that is one of the inputs (the same file after realpath, or the same inode
    through a hard link), two outputs that are one file, an output that is a directory, and one whose directory
    does not exist. outputs: flag -> path ('-' and None are stdout / not written). Call before writing: these
    were found only after the model loaded, or after the whole job (a --summary path), as tracebacks."""
    real_in = {os.path.realpath(p): p for p in inputs if p and p != "-"}
    written: dict[str, str] = {}
    for flag, out in outputs.items():
        if not out or out == "-":
            continue
        if os.path.isdir(out):
            raise SystemExit(f"{flag} {out} is a directory; give {flag} a file path")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise SystemExit(f"{flag} {out}: the directory {parent} does not exist; create it or give another path")
        real = os.path.realpath(out)
        if real in written:
            raise SystemExit(f"{flag} {out} is the same file as {written[real]}; each output needs its own path "
                             f"(one would overwrite the other)")
        written[real] = f"{flag} {out}"
        same = real_in.get(real)
        if same is None and os.path.exists(out):
            same = next((p for p in real_in.values() if os.path.exists(p) and os.path.samefile(p, out)), None)
        if same is not None:
            raise SystemExit(f"{flag} {out} is the input file {same} (same file: {real}); writing it would destroy "
                             f"the input. Give {flag} a different path")


def _open_locked(path: str) -> tuple[IO[str], bool]:
    """The output, opened for appending and flock'ed (exclusive, not waiting), and whether this call created it.
    Not truncated here (JobRunner.run does, unless resuming), so a run that finds the file locked, or that stops
    before it runs, has changed nothing."""
    try:
        fd, created = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644), True
    except FileExistsError:
        fd, created = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{path} is being written by another run (it holds the file's lock); wait for it to end "
                         f"or give -o another path") from None
    return os.fdopen(fd, "a"), created


def failure_reason(error: str) -> str:
    """A short reason for the summary's failure counts, from an error message."""
    e = error.lower()
    for key, reason in (("nested too deeply", "nested too deeply"), ("lone surrogate", "invalid text"),
                        ("malformed json", "malformed JSON"), ("not a json object", "not a JSON object"),
                        ("non-finite", "non-finite number"), ("max_model_len", "prompt exceeds the context"),
                        ("exceeds the context", "prompt exceeds the context"),
                        ("kv block", "KV pool too small"), ("'steps'", "missing or invalid field"),
                        ("'problem'", "missing or invalid field"), ("needs", "missing or invalid field"),
                        ("unknown keys", "unknown keys"), ("accepted", "invalid value")):
        if key in e:
            return reason
    return "other"


def _finished_rows(path: str) -> list[dict[str, Any]]:
    """Rows already in an output file; a partial last line (a write cut short) is removed from the file."""
    done: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    for lineno, raw in enumerate(data[:keep].split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError: said below, per line
            int(row["index"])
            done.append(row)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{lineno}: cannot resume from this file: not an output row of prmkern "
                             f"({e}); give --resume only with the -o file of an earlier run of the same command")
    return done


@dataclass
class JobRunner:
    """Writes rows to `output` ('-' = stdout) as they come; resumes; counts failures; handles Ctrl-C."""

    output: str = "-"
    resume: bool = False
    resume_hint: str = ""  # the command line that continues this job, printed on Ctrl-C
    inputs: list[str] = field(default_factory=list)  # input files the output must not be (check_output_paths)
    rows: list[dict[str, Any]] = field(default_factory=list)  # this run's rows, in the order written
    earlier: list[dict[str, Any]] = field(default_factory=list)  # rows of the run(s) this one resumes
    skipped: int = 0  # finished in an earlier run (--resume)
    interrupted: bool = False
    seconds: float = 0.0
    shard: shards.Shard | None = field(default_factory=shards.Shard.from_env)  # data-parallel: this rank
    _out: IO[str] | None = field(default=None, init=False, repr=False)  # the locked output (lock() to run())
    _created: bool = field(default=False, init=False, repr=False)

    def lock(self) -> "JobRunner":
        """Opens and locks the output now (run() does it otherwise): a command calls this before its model loads,
        so a second run on the same output stops at once instead of after loading. Nothing is written or
        truncated until run(). No-op for stdout and for a data-parallel rank (each writes its own part file)."""
        check_output_paths(self.inputs, {"-o": self.output})
        if self.resume and self.output == "-":
            raise SystemExit("--resume needs -o FILE (the output of the run to continue), not stdout")
        if self._out is None and self.output != "-" and self.shard is None:
            self._out, self._created = _open_locked(self.output)
        return self

    def unlock(self) -> None:
        """Gives the lock back without running (what lock() took when the model then fails to load); removes the
        output when lock() created it, so a failed start leaves no empty file behind."""
        if self._out is not None:
            if self._created:
                os.unlink(self.output)
            self._out.close()
            self._out = None

    @contextlib.contextmanager
    def locked(self) -> Iterator["JobRunner"]:
        """`with runner.locked(): llm = load()`: takes the output's lock before the block (a second run on this
        output stops before its model loads) and keeps it for run(); if the block raises, unlock()s."""
        self.lock()
        try:
            yield self
        except BaseException:
            self.unlock()
            raise

    @property
    def writes_summary(self) -> bool:
        """Whether this process reports on the whole job (not a data-parallel rank other than 0)."""
        return self.shard is None or self.shard.rank == 0

    def run(self, items: list[Item], process: Callable[[list[Item], Callable[[int, dict], None]], None],
            batch_size: int = 1, progress: Any = None, align: bool = False,
            whole: bool = False) -> list[dict[str, Any]]:
        """Runs `process` over the pending items in batches; `progress(n)` is called per finished item.
        align: batches are the items with equal index // batch_size (fewer where some are finished or bad), so a
        record's batch, and whatever depends on it, is the same in a resumed run as in an uninterrupted one.
        whole: one process call over every pending good item (a process that keeps its engine full across records
        and emits rows as they finish); a data-parallel rank still gets its share batch by batch."""
        if self.shard is not None:
            check_output_paths(self.inputs, {"-o": self.output})
            return self._run_sharded(items, process, max(1, batch_size), progress, align)
        # Locked before the earlier rows are read: a second run on this output stops here, having read nothing.
        self.lock()
        out: IO[str] = sys.stdout if self._out is None else self._out
        self._out = None  # run() owns it now: closed below
        try:
            if self.resume:
                self.earlier = _finished_rows(self.output)
            elif out is not sys.stdout and stat.S_ISREG(os.fstat(out.fileno()).st_mode):  # /dev/null: no truncate
                os.ftruncate(out.fileno(), 0)
        except BaseException:
            out.close()
            raise
        done = {int(r["index"]) for r in self.earlier}
        pending = [it for it in items if it.index not in done]
        self.skipped = len(items) - len(pending)
        by_index = {it.index: it for it in pending}
        written: set[int] = set()  # emitted (the row exists), whether or not it is in the file yet
        # Rows go to the file in input order: a finished row waits for the rows of earlier records (at most the
        # records in flight, since records start in order); whatever waits is written when the run stops.
        order = [it.index for it in pending]
        held: dict[int, dict[str, Any]] = {}
        next_pos = 0

        def write(row: dict[str, Any]) -> None:
            out.write(_line(row) + "\n")
            self.rows.append(row)

        def emit(index: int, row: dict[str, Any]) -> None:
            nonlocal next_pos
            if index in written:
                raise AssertionError(f"record {index} emitted twice")
            written.add(index)
            held[index] = row
            while next_pos < len(order) and order[next_pos] in held:
                write(held.pop(order[next_pos]))
                next_pos += 1
            out.flush()
            if progress is not None:
                progress(1)

        start = time.perf_counter()
        try:
            bad = [it for it in pending if it.error is not None]
            for it in bad:  # input errors first: they cost nothing (their rows take their place in the file)
                emit(it.index, it.row(error=it.error))
            good = [it for it in pending if it.error is None]
            for batch in ([good] if whole and good else _batches(good, max(1, batch_size), align)):
                _process(batch, process, emit, written)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.seconds = time.perf_counter() - start
            for index in sorted(held, key=order.index):  # stopped early: keep what was computed (--resume skips it)
                write(held.pop(index))
            out.flush()
            if out is not sys.stdout:
                out.close()
        missing = [i for i in by_index if i not in written]
        if not self.interrupted and missing:
            raise AssertionError(f"process() wrote no row for records {missing[:10]}")
        if self.interrupted:
            print(f"\ninterrupted: {len(written)} records written this run ({self.skipped} before), "
                  f"{len(missing)} left; {self.output} is valid JSONL. Continue with:\n  {self.resume_hint}",
                  file=sys.stderr)
        return self.rows

    def _run_sharded(self, items: list[Item], process: Callable, size: int, progress: Any,
                     align: bool) -> list[dict[str, Any]]:
        """The data-parallel run (shards.py): this rank's batches into its part file; rank 0 merges. The batches
        are the single-process run's, records rejected before the engine included, so each row is the same bytes.
        Returns every row on rank 0 (in the merged file's order), none on the other ranks; exits 1 on every rank
        when a rank failed (its records are reported by rank 0 and redone by a rerun)."""
        assert align, "a data-parallel job's batches are aligned (index // size), or ranks could not agree on them"
        shard, parts = self.shard, shards.parts_dir(self.output)
        groups: dict[int, list[Item]] = {}  # batch b: the records with index // size == b, bad ones included
        for it in items:
            groups.setdefault(it.index // size, []).append(it)
        batches = [groups[k] for k in sorted(groups)]
        start = time.perf_counter()
        shards.connect()
        try:
            mine = shards.plan(shard, parts, [[it.index for it in b] for b in batches])
            path = shards.open_part(shard, parts)
            error = None
            try:
                for count, b in enumerate(mine, 1):
                    lines: dict[int, str] = {}

                    def emit(index: int, row: dict[str, Any]) -> None:
                        if index in lines:
                            raise AssertionError(f"record {index} emitted twice")
                        lines[index] = _line(row)
                        if progress is not None:
                            progress(1)
                    bad = [it for it in batches[b] if it.error is not None]
                    for it in bad:
                        emit(it.index, it.row(error=it.error))
                    good = [it for it in batches[b] if it.error is None]
                    if good:
                        _process(good, process, emit, lines)
                    missing = [it.index for it in batches[b] if it.index not in lines]
                    if missing:
                        raise AssertionError(f"process() wrote no row for records {missing[:10]}")
                    shards.append_batch(path, list(lines), list(lines.values()), [it.index for it in bad])
                    shards.inject_fault(shard, count)
            except Exception as e:  # noqa: BLE001 - reported by rank 0; the other ranks' records are kept
                error = f"{type(e).__name__}: {e}"
                shards.record_failure(shard, parts, error, [it.index for b in mine for it in batches[b]])
            shards.barrier()
            merged = shards.merge(self.output, parts, len(items)) if shard.rank == 0 else []
            self.seconds = time.perf_counter() - start
            if error is not None or merged is None:
                raise SystemExit(1)
            self.rows = [json.loads(line) for line in merged]
            if shard.rank == 0:
                print(f"merged {len(items)} records from {shard.world} ranks into {self.output}", file=sys.stderr)
            return self.rows
        finally:
            shards.disconnect()

    def failures(self, include_earlier: bool = False) -> list[dict[str, Any]]:
        rows = self.earlier + self.rows if include_earlier else self.rows
        return [{"index": r["index"], "line": r.get("line"), "error": r["error"],
                 "reason": failure_reason(r["error"])} for r in rows if r.get("error")]

    def summary(self, total: int, engine: dict[str, int] | None, chains: int = 0,
                **extra: Any) -> dict[str, Any]:
        """Counts, failures by reason, throughput and the engine's counters, as one JSON-able dict. Succeeded,
        failed and failures cover the whole output file (a resumed run's earlier rows too); throughput, this run."""
        fails = self.failures(include_earlier=True)
        s = max(self.seconds, 1e-9)
        out: dict[str, Any] = {
            "records": total, "written": len(self.rows), "resumed_skipped": self.skipped,
            "succeeded": len(self.earlier) + len(self.rows) - len(fails), "failed": len(fails),
            "failures_by_reason": dict(Counter(f["reason"] for f in fails)), "failures": fails,
            "interrupted": self.interrupted, "seconds": round(self.seconds, 3),
            "records_per_s": round(len(self.rows) / s, 4), "chains": chains, "chains_per_s": round(chains / s, 4)}
        if self.shard is not None:  # the engine counters and chains are rank 0's alone: not reported as the job's
            engine = None
            for key in ("chains", "chains_per_s"):
                del out[key]
            out["data_parallel_ranks"] = self.shard.world
        if engine is not None:
            out["generated_tokens_per_s"] = round(engine.get("generated_tokens", 0) / s, 2)
            out["engine"] = engine
        out.update(extra)
        return out


def _batches(good: list[Item], size: int, align: bool) -> list[list[Item]]:
    """align: the items with equal index // size (fewer where some are finished or bad), so a record's batch, and
    whatever depends on it, is the same in a resumed run as in an uninterrupted one; else consecutive items."""
    if not align:
        return [good[i:i + size] for i in range(0, len(good), size)]
    groups: dict[int, list[Item]] = {}
    for it in good:
        groups.setdefault(it.index // size, []).append(it)
    return list(groups.values())


def _process(batch: list[Item], process: Callable, emit: Callable[[int, dict], None], written: Any) -> None:
    """One batch. A batch that raises is retried one record at a time, so the record that broke it fails alone and
    the job goes on; a FatalEngineError (no later batch can run, e.g. a dead tensor-parallel rank) is raised rather
    than writing every remaining record as failed (--resume redoes them)."""
    try:
        process(batch, emit)
    except FatalEngineError:
        raise
    except Exception as e:  # noqa: BLE001
        left = [it for it in batch if it.index not in written]
        for it in left:
            err: Exception = e
            if len(left) > 1:
                try:
                    process([it], emit)
                except FatalEngineError:
                    raise
                except Exception as e1:  # noqa: BLE001
                    err = e1
            if it.index not in written:
                emit(it.index, it.row(error=f"{type(err).__name__} while processing: {err}"))


def _line(row: dict[str, Any]) -> str:
    return json.dumps(json_safe(row), allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def json_safe(o: Any) -> Any:
    """NaN/inf floats become None so a summary is always valid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(json_safe(summary), f, indent=1, default=_json_default)
            f.write("\n")
