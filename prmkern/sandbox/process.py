"""Starting, stopping and cleaning up one sandbox (engine side): its process, pipes, uid and directories.

``SandboxProcess`` starts the child program (bootstrap.py) with a scrubbed environment and three pipes: the
request pipe (engine -> supervisor: snippets), the reply pipe (supervisor -> engine: one report per snippet)
and, in the namespace modes, the lifeline (closing it makes the launcher kill the whole PID namespace).
stdout and stderr are the code's output. Root mode reserves a private uid per live sandbox, across
processes, by flock on a file per uid. Where the host has a usable memory cgroup, each sandbox gets its own
group(s) (cgroups.py), joined by its first process before anything else runs, removed at cleanup.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from prmkern.sandbox import bootstrap, cgroups, fsview
from prmkern.sandbox.config import SandboxLimits

DEFAULT_UID_BASE = 1_900_000_000  # above systemd's container uid range (up to 0x6FFF0000)
DEFAULT_UID_COUNT = 4096
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
_uid_lock = threading.Lock()
# Rotates, so a uid whose killed processes are still being reaped (they count against RLIMIT_NPROC) is not
# reused at once.
_uid_cursor = [os.getpid() * 7919]


class _UidSlot:
    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self.fd = uid, fd

    def release(self) -> None:
        os.close(self.fd)


def _acquire_uid(base: int, count: int) -> _UidSlot:
    lock_dir = os.path.join(tempfile.gettempdir(), "prmkern-sandbox-uids")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    with _uid_lock:
        start = _uid_cursor[0] % count
        _uid_cursor[0] += 1
        for i in range(count):
            uid = base + (start + i) % count
            fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return _UidSlot(uid, fd)
    raise RuntimeError(f"all {count} sandbox uids from {base} are in use")


def _user_task_count() -> int:
    """Tasks (threads) of this real uid: what Linux compares RLIMIT_NPROC against outside root mode."""
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return n


class SandboxProcess:
    """One sandbox: the launcher (namespace modes) or supervisor (mode none) we started, and its pipes."""

    def __init__(self, limits: SandboxLimits, mode: str, python: str, *, uid_base: int = DEFAULT_UID_BASE,
                 uid_count: int = DEFAULT_UID_COUNT) -> None:
        self.mode, self.limits = mode, limits
        # Namespace modes: an empty directory the new root's tmpfs is mounted on (inside the namespace only).
        self.hostdir = tempfile.mkdtemp(prefix="prmkern-sbx-")
        self.slot: _UidSlot | None = None
        self.group: cgroups.SessionGroup | None = None  # the session's cgroup(s), where the host has them
        self.req_w = self.rep_r = self.life_w = None
        self.exit_code: int | None = None  # of the process we started
        self.reaped = False
        to_close: list[int] = []
        try:
            # A private uid wherever we can set one: root mode, and mode none when the engine is root.
            if mode == "root" or (mode == "none" and os.geteuid() == 0 and fsview.others_can_run(python)):
                self.slot = _acquire_uid(uid_base, uid_count)
                if mode == "none":  # its working directory is this host directory
                    os.chown(self.hostdir, self.slot.uid, bootstrap.SANDBOX_GID)
            support = cgroups.current_support()
            if support.memory:
                self.group = cgroups.SessionGroup(support, limits.memory_bytes, limits.max_processes)
            nproc = limits.max_processes + (0 if self.slot else _user_task_count())
            req_r, self.req_w = os.pipe()
            self.rep_r, rep_w = os.pipe()
            to_close += [req_r, rep_w]
            life_r = None
            if mode != "none":
                life_r, self.life_w = os.pipe()
                to_close.append(life_r)
            ns = mode != "none"
            cfg = bootstrap.child_config(
                limits, mode, uid=self.slot.uid if self.slot else -1, newroot=self.hostdir,
                workdir=bootstrap.WORKDIR if ns else self.hostdir, fs=fsview.fs_plan(python) if ns else [],
                nproc=nproc, req_fd=req_r, rep_fd=rep_w, life_fd=life_r,
                cgroup_procs=self.group.procs_files if self.group else [],
                cgroup_code_procs=self.group.code_procs_files if self.group else [])
            workdir = cfg["workdir"]
            self.proc = subprocess.Popen(
                [python, "-I", "-u", "-c", bootstrap.program(), json.dumps(cfg)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.hostdir,
                env=dict(_ENV, HOME=workdir, TMPDIR=workdir), start_new_session=True, pass_fds=to_close,
                close_fds=True)
        except BaseException:
            self.cleanup()
            raise
        finally:
            for fd in to_close:
                os.close(fd)
        self.pid = self.proc.pid
        for fd in (self.proc.stdout.fileno(), self.proc.stderr.fileno(), self.rep_r):
            os.set_blocking(fd, False)

    def poll(self) -> bool:
        """Reaps the process we started if it has exited; True once it has."""
        if self.reaped:
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.reaped = True
        self.exit_code = self.proc.returncode = os.waitstatus_to_exitcode(status)
        return True

    def kill(self) -> None:
        """Ends the sandbox: every process of it dies (the PID namespace, or the supervisor's descendants)."""
        for name in ("req_w", "life_w"):  # closing the request pipe makes the supervisor kill and exit
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        if self.mode == "none" and not self.reaped:
            try:  # the supervisor kills its descendants on SIGTERM (it may be busy with a snippet)
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not self.poll():
            time.sleep(0.002)
        if not self.reaped:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self) -> None:
        while not self.poll():
            time.sleep(0.002)

    def cleanup(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            self.kill()
            self.reap()
            for f in (proc.stdout, proc.stderr):
                f.close()
        for name in ("req_w", "rep_r", "life_w"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        shutil.rmtree(self.hostdir, ignore_errors=True)
        if getattr(self, "group", None) is not None:
            group, self.group = self.group, None
            group.remove()  # after the reap: every process of the session is gone
