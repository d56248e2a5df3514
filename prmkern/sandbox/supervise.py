"""Running one snippet in a started sandbox (engine side): send it, pump its output, enforce the wall clock
and the output cap, read the supervisor's reply defensively, and turn all of it into a SandboxResult.

Every way a snippet can end maps to a status and an ``error`` sentence; nothing the code does makes this
module raise. The reply comes from the sandbox's supervisor (child_supervisor.py), which the code cannot
reach; it is parsed as untrusted anyway: a malformed reply fails that snippet ("sandbox_error") alone. A limit
status the code's worker reports is accepted only with the kernel's evidence (``_verified``); an OOM kill counted by
the session's memory cgroup is "memory_limit".
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import struct
import time

from prmkern.sandbox import bootstrap
from prmkern.sandbox.config import HARD_WALL_FACTOR, SandboxLimits, SandboxResult
from prmkern.sandbox.process import SandboxProcess

_REPLY_MAX = 1 << 16
_REPLY_GRACE_S = 0.5  # past the output cap: how long a reply may still arrive (see _pump)
_REPLY_FIELDS = {"event": str, "exit_code": (int, type(None)), "cpu": (int, float), "state_lost": bool}
_EVENTS = ("done", "exited", "cpu_limit", "timeout", "protocol_error")
_DONE_STATUSES = ("ok", "error", "timeout", "memory_limit", "process_limit")


class _Output:
    """Captured stdout/stderr with one shared byte cap."""

    def __init__(self, cap: int) -> None:
        self.cap, self.total, self.over = cap, 0, False
        self.parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def add(self, name: str, data: bytes) -> None:
        room = self.cap - self.total
        if len(data) > room:
            data, self.over = data[:max(room, 0)], True
        self.total += len(data)
        self.parts[name].append(data)

    def text(self, name: str) -> str:
        return b"".join(self.parts[name]).decode("utf-8", errors="replace")


def _drain(fd: int, name: str, out: _Output) -> bool:
    """Reads what is available; False at EOF."""
    while not out.over:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        out.add(name, data)
    return True


def _send(proc: SandboxProcess, data: bytes, deadline: float) -> bool:
    """Writes the request frame; False if the supervisor is gone or did not take it in time."""
    view = memoryview(struct.pack("<I", len(data)) + data)
    os.set_blocking(proc.req_w, False)
    while view:
        if time.monotonic() > deadline or proc.poll():
            return False
        try:
            view = view[os.write(proc.req_w, view):]
        except BlockingIOError:
            time.sleep(0.001)
        except (BrokenPipeError, OSError):
            return False
    return True


def _pump(proc: SandboxProcess, deadline: float, out: _Output, reply: bytearray) -> str:
    """Until the snippet ends: 'reply' | 'exited' | 'timeout' | 'output_limit' | 'bad_reply' | 'reply_over_limit'.

    Past the output cap the output is no longer read, and the supervisor's reply is awaited for _REPLY_GRACE_S: a
    snippet that broke its report channel and flooded its output (in that order, as code writing over every
    descriptor does) is a protocol error ('reply_over_limit' carries the reply), not only an output limit."""
    sel = selectors.DefaultSelector()
    sel.register(proc.proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(proc.rep_r, selectors.EVENT_READ, "reply")
    over_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if over_at is not None and now >= min(deadline, over_at + _REPLY_GRACE_S):
                return "output_limit"
            if now >= deadline:
                return "timeout"
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                if key.data == "reply":
                    try:
                        chunk = os.read(proc.rep_r, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    reply.extend(chunk)
                    if len(reply) > _REPLY_MAX:
                        return "bad_reply"
                    if len(reply) >= 4 and len(reply) >= 4 + struct.unpack("<I", reply[:4])[0]:
                        # Nothing of the snippet runs any more: what it wrote is all in the pipes.
                        if over_at is None:
                            _drain(proc.proc.stdout.fileno(), "stdout", out)
                            _drain(proc.proc.stderr.fileno(), "stderr", out)
                        if out.over:
                            return "reply_over_limit" if over_at is not None else "output_limit"
                        return "reply"
                elif over_at is None and not _drain(key.fd, key.data, out):
                    sel.unregister(key.fd)
            if out.over and over_at is None:
                over_at = time.monotonic()
                for f in (proc.proc.stdout, proc.proc.stderr):
                    try:
                        sel.unregister(f.fileno())
                    except (KeyError, ValueError):
                        pass
            if proc.poll():
                if over_at is not None:
                    return "output_limit"
                _drain(proc.proc.stdout.fileno(), "stdout", out)
                _drain(proc.proc.stderr.fileno(), "stderr", out)
                try:
                    reply.extend(os.read(proc.rep_r, _REPLY_MAX + 1))
                except (BlockingIOError, OSError):
                    pass
                ok = len(reply) >= 4 and len(reply) == 4 + struct.unpack("<I", reply[:4])[0]
                return "reply" if ok else "exited"
    finally:
        sel.close()


def _parse_reply(raw: bytes) -> dict | None:
    """The supervisor's reply, or None if it is not one (length, JSON, fields and types all checked)."""
    try:
        (n,) = struct.unpack("<I", raw[:4])
        if n != len(raw) - 4:
            return None
        msg = json.loads(raw[4:].decode("utf-8"))
    except (struct.error, ValueError):
        return None
    if not isinstance(msg, dict) or msg.get("event") not in _EVENTS:
        return None
    for name, types in _REPLY_FIELDS.items():
        if name not in msg or not isinstance(msg[name], types) or isinstance(msg[name], bool) != (types is bool):
            return None
    if msg["event"] == "done" and (msg.get("status") not in _DONE_STATUSES or any(
            type(msg.get(k)) is not int for k in ("killed_processes", "vm_peak", "peak_tasks"))):
        return None
    exc = msg.get("exc")
    if exc is not None and not (isinstance(exc, list) and len(exc) == 3 and all(isinstance(x, str) for x in exc)):
        return None
    return msg


def _verified(msg: dict, limits: SandboxLimits, memory_events: int) -> str | None:
    """None if the limit a "done" report claims is backed by what the kernel saw, else why not. The report is
    written in the worker, where the code runs, so the code can forge it (the token it carries is readable from
    the worker's frames); the supervisor's figures and the memory cgroup's counters it cannot."""
    if msg["status"] == "memory_limit" and not (memory_events > 0 or 2 * msg["vm_peak"] >= limits.memory_bytes):
        return (f"the code reported memory_limit, but the session's memory did not reach its limit (peak address "
                f"space {msg['vm_peak']} of {limits.memory_bytes} bytes, no memory cgroup event)")
    if msg["status"] == "process_limit" and 2 * msg["peak_tasks"] < limits.max_processes:
        return (f"the code reported process_limit, but at most {msg['peak_tasks']} of {limits.max_processes} "
                "processes/threads were seen")
    return None


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _from_exit(rc: int | None, cpu: float | None, limits: SandboxLimits, stderr: str) -> tuple[str, str | None]:
    """(status, error) for a worker that ended with exit status rc."""
    if rc == 0:
        return "ok", None
    if rc == bootstrap.EXIT_SETUP and bootstrap.SETUP_MSG in stderr:
        return "sandbox_error", "the sandbox could not be set up: " + stderr.strip()[-300:]
    if rc == bootstrap.EXIT_MEMORY:
        return "memory_limit", f"memory over {limits.memory_bytes} bytes (address space)"
    if rc == bootstrap.EXIT_NPROC:
        return "process_limit", f"process or thread creation refused at {limits.max_processes} processes"
    if rc == bootstrap.EXIT_CHANNEL:
        return "protocol_error", "the code closed or broke the worker's pipes to its supervisor"
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and (cpu or 0.0) >= limits.cpu_time_s):
            return "cpu_limit", f"CPU time over {limits.cpu_time_s}s"
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
                "MemoryError" in stderr or "memory" in stderr.lower()):
            return "memory_limit", f"crashed ({_signal_name(sig)}) allocating memory"
        return "killed", f"the code's process died of {_signal_name(sig)}"
    return "error", f"the code exited with status {rc}"


def _error_line(stderr: str, rc: int | None) -> str:
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if rc == 1 and last:
        return "the code raised " + last[-1].strip()[:200]
    return f"the code exited with status {rc}"


def execute(proc: SandboxProcess, code: str, limits: SandboxLimits, res: SandboxResult) -> SandboxResult:
    """Runs `code` in `proc`; fills and returns `res` (its isolation fields already set)."""
    t0 = time.monotonic()
    # The supervisor times the snippet out on wall clock less CPU waiting; this real-time backstop only catches a
    # supervisor that cannot answer (stopped or starved beyond reason).
    deadline = t0 + limits.wall_time_s * HARD_WALL_FACTOR
    events0 = proc.group.memory_events() if proc.group is not None else 0
    out, reply = _Output(limits.max_output_bytes), bytearray()
    if _send(proc, code.encode("utf-8", "surrogatepass"), deadline):
        outcome = _pump(proc, deadline, out, reply)
    else:
        outcome = "exited" if proc.poll() else "timeout"
        if outcome == "exited":
            _drain(proc.proc.stdout.fileno(), "stdout", out)
            _drain(proc.proc.stderr.fileno(), "stderr", out)
    stderr = out.text("stderr")
    if outcome == "reply_over_limit":
        over = _parse_reply(bytes(reply))
        outcome = "reply" if over is not None and over["event"] == "protocol_error" else "output_limit"
    msg = _parse_reply(bytes(reply)) if outcome == "reply" else None
    memory_events = (proc.group.memory_events() - events0) if proc.group is not None else 0
    res.state_lost = True
    if outcome == "timeout":
        res.status, res.exit_code = "timeout", -signal.SIGKILL
        res.error = (f"real time over {limits.wall_time_s * HARD_WALL_FACTOR:g}s ({HARD_WALL_FACTOR}x wall_time_s): "
                     "the snippet's supervisor did not end it sooner (its processes waited for a CPU most of the "
                     "time, or the supervisor was stopped)")
    elif outcome == "output_limit":
        res.status, res.error = "output_limit", f"output over {limits.max_output_bytes} bytes"
    elif outcome == "bad_reply" or (outcome == "reply" and msg is None):
        res.status, res.error = "sandbox_error", "the sandbox's supervisor sent an unreadable reply"
    elif outcome == "exited":
        proc.reap()
        if proc.exit_code == bootstrap.EXIT_SETUP and bootstrap.SETUP_MSG in stderr:
            res.status, res.error = _from_exit(proc.exit_code, None, limits, stderr)
        elif memory_events > 0 and proc.exit_code == -signal.SIGKILL:
            # The session's cgroup counted an OOM kill during this snippet and the supervisor died of SIGKILL: the
            # kernel took it too, after (or instead of) the code's process, e.g. while memfd pages the code left
            # were still charged to the group. The cause is the code's memory, so the status says so.
            res.status = "memory_limit"
            res.error = (f"session memory over {limits.memory_bytes} bytes (its memory cgroup: processes, tmpfs "
                         "files, memfds and shared memory together); the kernel killed the code's process and the "
                         "sandbox's supervisor with it")
        elif proc.mode == "none" and proc.exit_code is not None and proc.exit_code < 0:
            # Without a PID namespace the code may signal its supervisor (NOT_ISOLATED["none"]).
            res.status = "killed"
            res.error = f"the sandbox's supervisor died of {_signal_name(-proc.exit_code)} (the code can " \
                        "signal it in isolation 'none')"
        else:
            res.status = "sandbox_error"
            res.error = f"the sandbox's supervisor ended without a reply (exit status {proc.exit_code})"
    else:
        res.cpu_time_s, res.exit_code, res.state_lost = float(msg["cpu"]), msg["exit_code"], msg["state_lost"]
        event = msg["event"]
        unverified = _verified(msg, limits, memory_events) if event == "done" else None
        if unverified is not None:
            res.status, res.killed_processes = "error", msg["killed_processes"]
            res.error = f"{_error_line(stderr, 1)}; {unverified}"
        elif event == "done":
            res.status, res.killed_processes = msg["status"], msg["killed_processes"]
            res.exception = tuple(msg["exc"]) if msg.get("exc") else None
            if res.status == "error" and res.exception is not None and res.exception[0] != "base":
                res.error = f"the code raised {res.exception[1]}: {res.exception[2][:200]}"
            elif res.status == "timeout":
                res.error = (f"interrupted after {limits.interrupt_after_s:g}s of wall clock (TimeoutError raised "
                             f"in the snippet; the session's state is kept)")
            else:
                res.error = None if res.status == "ok" else (
                    _error_line(stderr, res.exit_code) if res.status == "error" else _from_exit(
                        {"memory_limit": bootstrap.EXIT_MEMORY, "process_limit": bootstrap.EXIT_NPROC}[res.status],
                        None, limits, stderr)[1])
            if msg.get("threads_left"):
                res.error = (res.error + "; " if res.error else "") + (
                    f"{msg['threads_left']} thread(s) of the snippet were still running: the worker was "
                    "replaced and the session's state is lost")
        elif event == "cpu_limit":
            res.status, res.error = "cpu_limit", f"CPU time over {limits.cpu_time_s}s"
        elif event == "timeout":
            res.status, res.exit_code = "timeout", -signal.SIGKILL
            res.error = str(msg.get("error") or f"wall clock over {limits.wall_time_s}s")
        elif memory_events > 0 and res.exit_code == -signal.SIGKILL:
            res.status = "memory_limit"
            res.error = (f"session memory over {limits.memory_bytes} bytes (its memory cgroup: processes, tmpfs "
                         "files, memfds and shared memory together); the kernel killed the code's process")
        elif event == "protocol_error":
            res.status, res.error = "protocol_error", str(msg.get("error") or "reply channel broken")
        else:
            res.status, res.error = _from_exit(res.exit_code, res.cpu_time_s, limits, stderr)
            if res.status == "error":
                res.error = _error_line(stderr, res.exit_code)
    res.stdout, res.stderr, res.output_truncated = out.text("stdout"), stderr, out.over
    res.wall_time_s = time.monotonic() - t0
    return res
