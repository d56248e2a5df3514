"""The public entry points: probe_isolation, run_code, run_many, SandboxSession and SessionPool.

A session keeps one sandbox (one worker holding the snippets' globals, as GenPRM's executor does) and runs
snippets one at a time under the same per-snippet limits. Whatever a snippet does, ``run`` returns a
SandboxResult (a failure of the sandbox itself is status "sandbox_error"); only bad arguments raise. When a
result has ``state_lost`` the sandbox was torn down and the next snippet starts a fresh one
(``fresh_state``). ``run_code`` is a one-snippet session.
"""
from __future__ import annotations

import os
import platform
import sys
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

from prmkern.sandbox import cgroups
from prmkern.sandbox.config import (
    HARD_WALL_FACTOR,
    ISOLATION_MODES,
    NOT_ISOLATED,
    ROOT_CODE_GAP,
    SECCOMP_MACHINES,
    IsolationInfo,
    SandboxLimits,
    SandboxResult,
)
from prmkern.sandbox.fsview import others_can_run
from prmkern.sandbox.process import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, SandboxProcess
from prmkern.sandbox.supervise import execute

_probe_cache: dict[tuple[str, str], IsolationInfo] = {}
_probe_lock = threading.Lock()


def _limits(mode: str, support: cgroups.Support) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(resource_control, what is enforced, what is not) for sessions on this host."""
    held = [*support.describe(),
            "timeouts: wall clock less the time the snippet's processes waited for a CPU (a neighbour cannot "
            f"make a snippet time out); real time capped at {HARD_WALL_FACTOR}x wall_time_s; CPU seconds summed "
            "over the snippet's processes",
            "tmpfs: /tmp and /dev/shm each max_file_bytes and max_tmpfs_files inodes" if mode != "none" else
            "tmpfs: none of its own in mode none (files go to a host directory, RLIMIT_FSIZE per file)"]
    gaps: list[str] = []
    if support.memory:
        kind = f"cgroup{support.version}"
    else:
        kind = "rlimits"
        held.append("shared memory: memfd_create and shmget refused (seccomp), nothing would bound them")
        gaps.append("session memory: no usable memory cgroup here (" + "; ".join(support.notes or ("none",))
                    + "): each process is held to memory_bytes of address space (RLIMIT_AS), so a session may "
                    "hold max_processes x memory_bytes while a snippet runs, plus its tmpfs files; pipes and "
                    "socket buffers are bounded only by the kernel's per-user limits")
        gaps.append("CPU share: no cpu cgroup: a session with many processes gets more CPU than one with few "
                    "(timeouts still do not count the wait)")
    return kind, tuple(held), tuple(gaps)


def _info(mode: str, python: str, notes: tuple[str, ...] = ()) -> IsolationInfo:
    gaps = NOT_ISOLATED[mode]
    if mode == "none" and os.geteuid() == 0 and not others_can_run(python):
        gaps = (ROOT_CODE_GAP, *gaps)
    if platform.machine() not in SECCOMP_MACHINES:
        gaps = (*gaps, f"syscalls: no seccomp filter on {platform.machine()} (sockets of every family, "
                       "AF_VSOCK included, io_uring, keyrings, bpf)")
    kind, held, missing = _limits(mode, cgroups.current_support())
    return IsolationInfo(mode, "best-effort" if mode == "none" else "namespace", notes, (*gaps, *missing), kind,
                         held)


def probe_isolation(isolation: str = "auto", python: str | None = None) -> IsolationInfo:
    """Which isolation works here (cached per interpreter). 'auto' tries root, then userns, then none."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    python = python or sys.executable
    key = (os.path.abspath(python), isolation)
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
        candidates = ["root", "userns", "none"] if isolation == "auto" else [isolation]
        notes: list[str] = []
        chosen = None
        for mode in candidates:
            if mode == "none":
                chosen = mode
                break
            if mode == "root" and os.geteuid() != 0:
                notes.append("root: not running as root")
                continue
            res = _run_once("pass", SandboxLimits(wall_time_s=30), _info(mode, python), python, DEFAULT_UID_BASE,
                            DEFAULT_UID_COUNT)
            if res.status != "ok" and cgroups.current_support().memory and "cgroup" in (res.error or ""):
                # the groups exist but this sandbox cannot join them (e.g. a user namespace without delegation)
                cgroups.disable(f"{mode}: {(res.error or '')[-200:]}")
                res = _run_once("pass", SandboxLimits(wall_time_s=30), _info(mode, python), python,
                                DEFAULT_UID_BASE, DEFAULT_UID_COUNT)
            if res.status == "ok":
                chosen = mode
                break
            notes.append(f"{mode}: {(res.error or res.status)[-300:]}")
        if chosen is None:
            raise RuntimeError(f"isolation {isolation!r} does not work on this machine: {notes}")
        info = _info(chosen, python, tuple(notes))
        _probe_cache[key] = info
        return info


def _check_code(code: object) -> str:
    """The caller's contract: a str. What is in it (NUL, lone surrogates, nonsense) is the snippet's business
    and comes back as that snippet's result, like any other error of the code."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str of Python source, got {type(code).__name__}")
    return code


def _blank(info: IsolationInfo, fresh: bool) -> SandboxResult:
    return SandboxResult(status="sandbox_error", stdout="", stderr="", exit_code=None, wall_time_s=0.0,
                         isolation=info.mode, network_isolation=info.network_isolation, fresh_state=fresh,
                         not_isolated=info.not_isolated)


def _run_once(code: str, limits: SandboxLimits, info: IsolationInfo, python: str, uid_base: int,
              uid_count: int) -> SandboxResult:
    sess = SandboxSession(limits, isolation=info.mode, python=python, uid_base=uid_base, uid_count=uid_count,
                          _info=info)
    try:
        return sess.run(code)
    finally:
        sess.close()


def run_code(code: str, limits: SandboxLimits | None = None, *, isolation: str = "auto",
             python: str | None = None, uid_base: int = DEFAULT_UID_BASE,
             uid_count: int = DEFAULT_UID_COUNT) -> SandboxResult:
    """Runs code in a fresh sandbox; never raises for anything the code does."""
    _check_code(code)
    python = python or sys.executable
    return _run_once(code, limits or SandboxLimits(), probe_isolation(isolation, python), python, uid_base,
                     uid_count)


def run_many(codes: Sequence[str], limits: SandboxLimits | None = None, *, max_workers: int | None = None,
             isolation: str = "auto", python: str | None = None) -> list[SandboxResult]:
    """Runs independent snippets concurrently (one sandbox each, a thread pool supervising); results in order."""
    if isinstance(codes, str) or not isinstance(codes, Sequence):
        raise TypeError(f"codes must be a sequence of str, got {type(codes).__name__}")
    for c in codes:
        _check_code(c)
    if not codes:
        return []
    workers = max_workers or min(len(codes), max(2, os.cpu_count() or 2))
    probe_isolation(isolation, python)  # once, before the threads start
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prmkern-sandbox") as pool:
        return list(pool.map(lambda c: run_code(c, limits, isolation=isolation, python=python), codes))


class SandboxSession:
    """One persistent worker: snippets share a globals dict, each under the same limits.

    Before a snippet's result is returned, every process it started is killed; if a thread of it is still
    running, or it hit a limit, or it broke its reply channel, the worker is replaced (``state_lost``) and the
    next snippet starts fresh (``fresh_state``). Concurrent ``run`` calls on one session are serialised.
    """

    def __init__(self, limits: SandboxLimits | None = None, *, isolation: str = "auto",
                 python: str | None = None, uid_base: int = DEFAULT_UID_BASE,
                 uid_count: int = DEFAULT_UID_COUNT, _info: IsolationInfo | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        self.info = _info or probe_isolation(isolation, self.python)
        self._uid = (uid_base, uid_count)
        self._proc: SandboxProcess | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._proc.poll()

    def run(self, code: str) -> SandboxResult:
        """Runs one snippet. Raises only for a non-str code or a closed session."""
        _check_code(code)
        with self._lock:
            if self._closed:
                raise ValueError("this SandboxSession is closed")
            fresh = self._proc is None or self._proc.poll()
            res = _blank(self.info, bool(fresh))
            try:
                if fresh:
                    self._discard()
                    self._proc = SandboxProcess(self.limits, self.info.mode, self.python, uid_base=self._uid[0],
                                                uid_count=self._uid[1])
                execute(self._proc, code, self.limits, res)
            except Exception as e:  # the sandbox's own failure (spawn, pipes): this snippet fails alone
                res.status, res.state_lost = "sandbox_error", True
                res.error = f"the sandbox failed: {type(e).__name__}: {e}"
            if res.state_lost:
                try:
                    self._discard()
                except Exception as e:  # cleanup trouble must not hide the result
                    res.error = (res.error or "") + f"; cleanup failed: {e}"
                    self._proc = None
            return res

    def _discard(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            proc.cleanup()

    def reset(self) -> None:
        """Drops the worker and its state; the next snippet starts fresh."""
        with self._lock:
            self._discard()

    def close(self) -> None:
        with self._lock:
            self._discard()
            self._closed = True

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.cleanup()


class SessionPool:
    """Sessions keyed by chain (e.g. (request, chain index)); runs one snippet per chain concurrently."""

    def __init__(self, limits: SandboxLimits | None = None, *, max_workers: int | None = None,
                 isolation: str = "auto", python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation, self.python = isolation, python
        self.info = probe_isolation(isolation, python)
        self._sessions: dict[Hashable, SandboxSession] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers or max(2, os.cpu_count() or 2),
                                        thread_name_prefix="prmkern-session")

    def session(self, key: Hashable) -> SandboxSession:
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = SandboxSession(self.limits, isolation=self.isolation, python=self.python,
                                                     _info=self.info)
            return self._sessions[key]

    def run(self, key: Hashable, code: str) -> SandboxResult:
        return self.session(key).run(code)

    def _run_guarded(self, key: Hashable, code: str) -> SandboxResult:
        try:
            return self.run(key, code)
        except Exception as e:  # e.g. the session was closed meanwhile: this item fails alone
            res = _blank(self.info, True)
            res.error, res.state_lost = f"the sandbox failed: {type(e).__name__}: {e}", True
            return res

    def run_many(self, items: Sequence[tuple[Hashable, str]]) -> list[SandboxResult]:
        """items: (chain key, code); snippets of different chains run concurrently, results in order."""
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise TypeError(f"items must be a sequence of (key, code) pairs, got {type(items).__name__}")
        for it in items:
            if not (isinstance(it, tuple) and len(it) == 2):
                raise TypeError(f"each item must be a (key, code) tuple, got {it!r:.80}")
            _check_code(it[1])
        futures = [self._pool.submit(self._run_guarded, key, code) for key, code in items]
        return [f.result() for f in futures]

    def close(self, key: Hashable) -> None:
        with self._lock:
            sess = self._sessions.pop(key, None)
        if sess is not None:
            sess.close()

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()
