"""Running model-written Python code outside the engine's process, contained.

A verifier such as GenPRM writes Python to check a step; that code is untrusted. It runs in a separate
interpreter (`python -I`) started with a fixed minimal environment (no variable of the engine's is passed on),
from a small bootstrap program that isolates it before running any of it:

* ``isolation="root"`` (the engine runs as root, as on our CI machines): new network, mount and PID namespaces.
  The code sees no network interface that is up (even 127.0.0.1 is unreachable), only its own processes (a
  fresh /proc), and private size-limited tmpfs mounts over the world-writable directories (/tmp, /var/tmp,
  /dev/shm, /run/lock) and over its working directory, so nothing it writes reaches the host. Directories the
  interpreter needs that an unprivileged user cannot enter (e.g. a Python under /root, mode 0700) are hidden
  behind an empty tmpfs with just the interpreter's directories bound back in. The code then runs under a
  private uid (one per live sandbox, from ``uid_base``.. ``uid_base+uid_count``, reserved across processes by
  flock), with no_new_privs: it cannot read root's files or /proc/<pid>/environ, cannot signal anything outside,
  and RLIMIT_NPROC counts only its own processes. The namespace's init (our code) reaps every orphan and kills
  what is left when the code ends, so nothing outlives a run and no zombie is left behind (this machine's pid 1
  does not reap orphans).
* ``isolation="userns"`` (not root, unprivileged user namespaces allowed): the same namespaces inside a user
  namespace, and a nested one so the code cannot undo the mounts. The code keeps the engine's uid: it can read
  what that user can read; RLIMIT_NPROC is that user's current task count plus the allowance.
* ``isolation="none"``: limits, scrubbed environment and a temporary working directory only; the network is
  blocked best-effort by an audit hook in the interpreter (ctypes or a subprocess get around it); cleanup is by
  process group; the code can signal the engine. As root, RLIMIT_NPROC does not bind at all.

``isolation="auto"`` picks the strongest mode that works here (probed once per process, cached); every result
says what it ran under (``isolation``, ``network_isolation`` = "namespace" | "best-effort").

Limits in every mode: wall clock (the run is SIGKILLed: its PID namespace, or its process group), CPU seconds
(RLIMIT_CPU), address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size (RLIMIT_FSIZE), open files, and
captured output (read incrementally; the run is killed when stdout+stderr pass the cap). Each result's
``status`` names the limit that stopped it.

``SandboxSession`` keeps one worker per chain whose globals persist across snippets (as GenPRM's executor
does), each snippet under the same limits; a snippet that has to be killed loses that state and the result
says so. ``run_many`` and ``SessionPool.run_many`` run many snippets concurrently on a thread pool.

It does not: inspect what the code computes, use seccomp or cgroups (memory is address space, not RSS), or
bound the number of files written other than by the tmpfs size. Linux only.
"""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "SandboxSession",
    "SessionPool",
    "IsolationInfo",
    "probe_isolation",
    "run_code",
    "run_many",
    "STATUSES",
]

STATUSES = (
    "ok",  # exited 0
    "error",  # the code raised or exited non-zero
    "timeout",  # wall-clock limit: killed by us
    "cpu_limit",  # RLIMIT_CPU: SIGXCPU, or SIGKILL at the hard limit
    "memory_limit",  # RLIMIT_AS: MemoryError (or a crash while allocating)
    "output_limit",  # stdout+stderr passed the cap: killed by us
    "process_limit",  # RLIMIT_NPROC: fork/thread creation refused and not handled
    "killed",  # died of another signal
    "sandbox_error",  # the sandbox itself could not be set up
)
ISOLATION_MODES = ("auto", "root", "userns", "none")

_EXIT_SETUP, _EXIT_MEMORY, _EXIT_NPROC = 85, 86, 87
_KEEP_SETUP_MSG = "prmkern-sandbox-setup-failed"
# World-writable places an unprivileged process could otherwise leave files in.
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SANDBOX_GID = 65534  # nogroup / nobody

# The program the child interpreter runs before the untrusted code. It receives a JSON config in argv[1].
# Kept self-contained (stdlib only) because it runs in a fresh `python -I`.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, select, signal, struct, sys, traceback
cfg = json.loads(sys.argv[1])
MODE = cfg["mode"]
# One-shot runs get their code on stdin (argv is capped at 128 KiB per argument); then stdin is emptied.
CODE = None if cfg["session"] else sys.stdin.buffer.read().decode("utf-8")
_devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(_devnull, 0)
os.close(_devnull)
libc = ctypes.CDLL(None, use_errno=True)

def _fail(msg):
    os.write(2, ("%s: %s\n" % (cfg["setup_msg"], msg)).encode())
    os._exit(cfg["exit_setup"])

def _c(name, *args):
    if getattr(libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s%r: %s" % (name, args, os.strerror(e)))

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x40000000, 0x10000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18

def _mounts(owner):
    _c("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"]}
    for path, opts in cfg["hide"]:
        _c("mount", b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())
    for p, fd in fds.items():
        os.makedirs(p, exist_ok=True)
        _c("mount", ("/proc/self/fd/%d" % fd).encode(), p.encode(), None, MS_BIND | MS_REC, None)
        os.close(fd)
    wd = cfg["workdir"]
    os.makedirs(wd, exist_ok=True)
    opts = "size=%d,mode=0700,uid=%d,gid=%d" % (cfg["tmpfs_bytes"], owner[0], owner[1])
    _c("mount", b"tmpfs", wd.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())
    # A fresh /proc for the new PID namespace: the code sees only its own processes.
    _c("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)

def _close_ctrl():
    for fd in cfg.get("ctrl", []):
        os.close(fd)

def _launch_namespaces():
    """B (this process): enters new namespaces, forks C, the namespace's init, and waits for it.

    C mounts, forks D (which drops privileges and runs the code), reaps every orphan, and when D ends kills
    what is left, reports D's exit status and CPU time on the status pipe and exits; the kernel then tears the
    whole PID namespace down. The engine stops a run by closing the lifeline pipe: B then kills C."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    if MODE == "userns":
        flags |= CLONE_NEWUSER
    _c("unshare", flags)
    if MODE == "userns":
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    status_fd, life_fd = cfg["status_fd"], cfg["life_fd"]
    c = os.fork()
    if c:  # B: never returns. No threads here (none can start after unshare(NEWPID)), and no imports (C's
        # mounts are in B's mount namespace too, and may hide the interpreter's files from root's view).
        try:
            _close_ctrl()
            os.close(status_fd)
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_w, False)
            signal.set_wakeup_fd(wake_w)
            signal.signal(signal.SIGCHLD, lambda *a: None)
            while True:
                pid, st = os.waitpid(c, os.WNOHANG)
                if pid:
                    os._exit(os.waitstatus_to_exitcode(st) & 0xFF if os.WIFEXITED(st) else 70)
                ready, _, _ = select.select([life_fd, wake_r], [], [])
                if life_fd in ready:  # EOF: the engine ended the run, or died
                    os.kill(c, signal.SIGKILL)
                    os.waitpid(c, 0)
                    os._exit(71)
                if wake_r in ready:
                    os.read(wake_r, 512)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(72)
    # C: pid 1 of the new namespace
    os.close(life_fd)
    _c("prctl", 1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: dies with B
    try:
        _mounts((cfg["uid"], cfg["gid"]) if MODE == "root" else (uid, gid))
    except OSError as e:
        _fail(str(e))
    d = os.fork()
    if d == 0:
        os.close(status_fd)
        return  # D continues below
    _close_ctrl()
    report = None
    while True:
        try:
            pid, st, ru = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if pid == d:
            report = {"exit_code": os.waitstatus_to_exitcode(st), "cpu": ru.ru_utime + ru.ru_stime}
            try:
                os.kill(-1, signal.SIGKILL)  # from init: every other process of the namespace
            except ProcessLookupError:
                pass
    if report is not None:
        os.write(status_fd, json.dumps(report).encode())
    os._exit(0)

def _drop_privileges():
    if MODE == "userns":
        # A nested user namespace owns neither the mounts nor the network namespace, so the code cannot
        # undo them.
        _c("unshare", CLONE_NEWUSER)
    os.chdir(cfg["workdir"])
    for name, value in cfg["limits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if MODE == "root":
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _c("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot raise privileges
    if MODE == "none":
        if cfg["pdeathsig"]:
            _c("prctl", 1, int(signal.SIGKILL), 0, 0, 0)
        def _no_network(event, args):
            if event.startswith("socket.") and event != "socket.gethostname":
                raise PermissionError("network access is disabled in the prmkern sandbox")
        sys.addaudithook(_no_network)

try:
    if MODE != "none":
        _launch_namespaces()
    _drop_privileges()
except OSError as e:
    _fail(str(e))
if cfg.get("probe"):
    os._exit(0)
MAIN_PID = os.getpid()

_forks = [0]
def _count_forks(event, args):
    if event in ("os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen", "os.system",
                 "_thread.start_new_thread"):
        _forks[0] += 1
sys.addaudithook(_count_forks)

def _classify(exc):
    """'memory_limit' | 'process_limit' | 'error' for an exception that escaped the code."""
    if isinstance(exc, MemoryError):
        return "memory_limit"
    if _forks[0] and (isinstance(exc, BlockingIOError) or
                      (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc))):
        return "process_limit"
    return "error"

def _run(code, ns):
    """Runs one snippet; returns (status, exit code)."""
    try:
        exec(compile(code, "<sandbox>", "exec"), ns)
        status, rc = "ok", 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
        status = "ok" if rc == 0 else "error"
    except BaseException as e:
        status = _classify(e)
        rc = {"memory_limit": cfg["exit_memory"], "process_limit": cfg["exit_nproc"]}.get(status, 1)
        try:  # the traceback starts at the code, not at this bootstrap
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except MemoryError:
            os.write(2, b"MemoryError\n")
    if os.getpid() != MAIN_PID:  # a child forked by the code must not continue into our loop
        os._exit(rc & 0xFF)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return status, rc

if cfg["session"]:
    rfd, wfd = cfg["ctrl"]
    ns = {"__name__": "__main__"}
    def _read(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(rfd, n - len(buf))
            if not chunk:
                os._exit(0)  # the engine closed the pipe (or died)
            buf += chunk
        return buf
    while True:
        (n,) = struct.unpack("<I", _read(4))
        code = _read(n).decode("utf-8")
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = int(used) + 1 + cfg["cpu_per_snippet"]  # whole seconds: round the used part up
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard < 0 else min(soft, hard), hard))
        _forks[0] = 0
        status, rc = _run(code, ns)
        msg = json.dumps({"status": status, "exit_code": rc}).encode()
        os.write(wfd, struct.pack("<I", len(msg)) + msg)
else:
    status, rc = _run(CODE, {"__name__": "__main__"})
    os._exit(rc & 0xFF)
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run (or per-snippet, in a session) limits. Sizes in bytes, times in seconds."""

    wall_time_s: float = 10.0
    cpu_time_s: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE, and the size of each private tmpfs
    max_open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s", "memory_bytes", "max_processes", "max_output_bytes",
                     "max_file_bytes", "max_open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if not isinstance(self.cpu_time_s, int):
            raise TypeError(f"SandboxLimits.cpu_time_s must be an int (RLIMIT_CPU is whole seconds), "
                            f"got {self.cpu_time_s!r}")


@dataclass
class SandboxResult:
    """What one run (or one session snippet) produced and why it stopped."""

    status: str  # one of STATUSES
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: no exit status (session snippet cut off)
    wall_time_s: float
    cpu_time_s: float | None = None  # user+system of the main process, when known
    output_truncated: bool = False
    isolation: str = "none"  # "root" | "userns" | "none"
    network_isolation: str = "best-effort"  # "namespace" | "best-effort"
    state_lost: bool = False  # session: the worker was killed, its globals are gone
    fresh_state: bool = True  # session: this snippet ran in a new, empty namespace

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class IsolationInfo:
    """What the sandbox can do on this machine."""

    mode: str  # "root" | "userns" | "none"
    network_isolation: str  # "namespace" | "best-effort"
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------------------
# Isolation planning (parent side)

_probe_cache: dict[tuple[str, str], IsolationInfo] = {}
_probe_lock = threading.Lock()
_paths_cache: dict[str, list[str]] = {}


def _interpreter_paths(python: str) -> list[str]:
    """Directories the child interpreter reads at run time (prefixes and sys.path), resolved."""
    if python not in _paths_cache:
        if os.path.realpath(python) == os.path.realpath(sys.executable):
            raw = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
            import site
            import sysconfig
            raw += [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
            raw += list(site.getsitepackages())
        else:
            import subprocess
            out = subprocess.run(
                [python, "-I", "-c", "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, "
                 "sys.exec_prefix, sys.base_exec_prefix] + sys.path))"],
                capture_output=True, text=True, timeout=30, env={}, check=True).stdout
            raw = json.loads(out)
        raw.append(os.path.dirname(os.path.realpath(python)))
        paths = {os.path.realpath(p) for p in raw if p and os.path.isdir(p)}
        _paths_cache[python] = sorted(paths)
    return _paths_cache[python]


def _other_can_enter(path: str) -> bool:
    return bool(os.stat(path).st_mode & 0o001)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _fs_plan(python: str, workdir: str, limits: SandboxLimits, mode: str) -> tuple[list, list]:
    """(hide, expose): tmpfs mounts [path, options] and directories re-bound inside them."""
    writable = {os.path.realpath(d) for d in (*_WRITABLE_DIRS, tempfile.gettempdir()) if os.path.isdir(d)}
    hide = {d: f"size={limits.max_file_bytes},mode=1777" for d in writable}
    needed = _interpreter_paths(python)
    if mode == "root":
        # The first proper ancestor a private uid cannot enter (e.g. /root, mode 0700) is replaced by an
        # empty tmpfs, and the interpreter's directories below it are bound back in: the uid can then run
        # Python but sees nothing else of that directory.
        for p in needed:
            parts = p.strip("/").split("/")
            for i in range(1, len(parts)):
                anc = "/" + "/".join(parts[:i])
                if not _other_can_enter(anc):
                    hide.setdefault(anc, "size=1m,mode=0755")
                    break
    # Keep only the outermost hidden directories; re-expose what the interpreter needs under them.
    tops = [h for h in hide if not any(h != o and _is_under(h, o) for o in hide)]
    expose = [p for p in needed if any(_is_under(p, h) and p != h for h in tops)]
    expose = [p for p in expose if not any(p != q and _is_under(p, q) for q in expose)]
    return [[h, hide[h]] for h in sorted(tops, key=len)], expose


# ---------------------------------------------------------------------------------------------------------
# uid slots (root mode): one private uid per live sandbox process, reserved across processes by flock.

class _UidSlot:
    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self.fd = uid, fd

    def release(self) -> None:
        os.close(self.fd)


_uid_lock = threading.Lock()
_uid_cursor = [os.getpid() * 7919]  # rotates, so a uid whose killed processes are still being reaped
                                    # (they count against RLIMIT_NPROC until then) is not reused at once


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
                st = os.stat(f"/proc/{entry}")
                if st.st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return n


# ---------------------------------------------------------------------------------------------------------
# Spawning and supervising one child

_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


class _Child:
    """One sandboxed interpreter: its pid, pipes, uid slot and working directory.

    In the namespace modes the process we start (B) only waits; the code runs two forks down, inside a new
    PID namespace whose init (C) reports the code's exit status and CPU time on the status pipe. Closing the
    lifeline pipe makes B kill C, which takes the whole namespace down with it."""

    def __init__(self, code: str | None, limits: SandboxLimits, mode: str, python: str, *, uid_base: int,
                 uid_count: int, session: bool, probe: bool = False) -> None:
        import subprocess
        self.mode, self.limits = mode, limits
        self.workdir = tempfile.mkdtemp(prefix="prmkern-sbx-")
        self.slot: _UidSlot | None = None
        self.ctrl_w = self.ctrl_r = self.status_r = self.life_w = None
        self.exit_code: int | None = None  # of the code's process
        self.cpu_time_s: float | None = None
        self.reaped = False
        to_close: list[int] = []
        try:
            if mode == "root":
                self.slot = _acquire_uid(uid_base, uid_count)
            nproc = limits.max_processes
            if mode != "root":
                nproc += _user_task_count()
            cpu = limits.cpu_time_s
            rl = {
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_NPROC": nproc,
                "RLIMIT_FSIZE": limits.max_file_bytes,
                "RLIMIT_NOFILE": limits.max_open_files,
                "RLIMIT_CORE": 0,
                # A session's soft limit is re-armed per snippet; the hard limit caps the whole session.
                "RLIMIT_CPU": [cpu, cpu + 1] if not session else [cpu, max(cpu * 1000, 3600)],
            }
            hide, expose = ([], []) if mode == "none" else _fs_plan(python, self.workdir, limits, mode)
            pass_fds: list[int] = []
            cfg = {
                "mode": mode, "uid": self.slot.uid if self.slot else -1, "gid": _SANDBOX_GID,
                "workdir": self.workdir, "hide": hide, "expose": expose, "tmpfs_bytes": limits.max_file_bytes,
                "limits": rl, "session": session, "probe": probe, "pdeathsig": not session,
                "cpu_per_snippet": cpu, "setup_msg": _KEEP_SETUP_MSG, "exit_setup": _EXIT_SETUP,
                "exit_memory": _EXIT_MEMORY, "exit_nproc": _EXIT_NPROC,
            }
            if session:
                req_r, self.ctrl_w = os.pipe()  # engine -> worker: snippets
                self.ctrl_r, resp_w = os.pipe()  # worker -> engine: per-snippet status
                cfg["ctrl"] = [req_r, resp_w]
                pass_fds += [req_r, resp_w]
                to_close += [req_r, resp_w]
            if mode != "none":
                self.status_r, status_w = os.pipe()
                life_r, self.life_w = os.pipe()
                cfg["status_fd"], cfg["life_fd"] = status_w, life_r
                pass_fds += [status_w, life_r]
                to_close += [status_w, life_r]
            argv = [python, "-I", "-u", "-c", _BOOTSTRAP, json.dumps(cfg)]
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL if session else subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=self.workdir, env=dict(_ENV, HOME=self.workdir, TMPDIR=self.workdir),
                start_new_session=True, pass_fds=pass_fds, close_fds=True)
            for fd in to_close:
                os.close(fd)
            to_close = []
            if not session:
                # The bootstrap reads all of stdin before anything else, so this cannot deadlock.
                try:
                    self.proc.stdin.write((code or "").encode("utf-8"))
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass  # it died at start-up; its exit status and stderr say why
        except BaseException:
            for fd in to_close:
                os.close(fd)
            self.cleanup()
            raise
        self.pid = self.proc.pid
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)

    def poll(self) -> bool:
        """Reaps the process we started if it has exited; True once it has."""
        if self.reaped:
            return True
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.reaped = True
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.status_r is None:
            self.exit_code, self.cpu_time_s = self.proc.returncode, ru.ru_utime + ru.ru_stime
        else:
            data = b""
            os.set_blocking(self.status_r, False)
            try:
                while chunk := os.read(self.status_r, 4096):
                    data += chunk
            except BlockingIOError:
                pass
            if data:  # no report: C itself was killed (timeout, output cap) or setup failed
                report = json.loads(data)
                self.exit_code, self.cpu_time_s = report["exit_code"], report["cpu"]
            elif self.proc.returncode == _EXIT_SETUP:
                self.exit_code = _EXIT_SETUP
            else:
                self.exit_code = -signal.SIGKILL  # the code died with its namespace
        return True

    def kill(self) -> None:
        """Ends the run: every process of it dies (the PID namespace, or the process group in mode none)."""
        if self.life_w is not None:
            os.close(self.life_w)
            self.life_w = None
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if self.poll():
                    return
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
        for name in ("ctrl_w", "ctrl_r", "status_r", "life_w"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        shutil.rmtree(self.workdir, ignore_errors=True)


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


def _supervise(child: _Child, deadline: float, out: _Output, resp: bytearray | None) -> str:
    """Pumps output until the run ends. Returns 'exited' | 'response' | 'timeout' | 'output_limit'."""
    sel = selectors.DefaultSelector()
    sel.register(child.proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(child.proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    if resp is not None:
        sel.register(child.ctrl_r, selectors.EVENT_READ, "resp")
    killed_leftovers = False
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if not sel.get_map():
                return "exited"
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                if key.data == "resp":
                    chunk = os.read(child.ctrl_r, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    resp.extend(chunk)
                    if len(resp) >= 4 and len(resp) >= 4 + struct.unpack("<I", resp[:4])[0]:
                        _drain(child.proc.stdout.fileno(), "stdout", out)
                        _drain(child.proc.stderr.fileno(), "stderr", out)
                        return "output_limit" if out.over else "response"
                elif not _drain(key.fd, key.data, out):
                    sel.unregister(key.fd)
                if out.over:
                    return "output_limit"
            if child.poll() and not killed_leftovers:
                # The main process is gone; background children may still hold the pipes open.
                child.kill()
                killed_leftovers = True
                deadline = min(deadline, time.monotonic() + 2.0)
    finally:
        sel.close()


def _status_from_exit(child: _Child, stderr: str) -> str:
    rc = child.exit_code
    if rc == 0:
        return "ok"
    if rc == _EXIT_SETUP and _KEEP_SETUP_MSG in stderr:
        return "sandbox_error"
    if rc == _EXIT_MEMORY:
        return "memory_limit"
    if rc == _EXIT_NPROC:
        return "process_limit"
    if rc is not None and rc < 0:
        sig = -rc
        cpu = child.cpu_time_s or 0.0
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= child.limits.cpu_time_s):
            return "cpu_limit"
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
                "MemoryError" in stderr or "memory" in stderr.lower()):
            return "memory_limit"
        return "killed"
    return "error"


# ---------------------------------------------------------------------------------------------------------
# Public API

def probe_isolation(isolation: str = "auto", python: str | None = None) -> IsolationInfo:
    """Which isolation works here (cached per interpreter). 'auto' tries root, then userns, then none."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    python = python or sys.executable
    key = (python, isolation)
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
        candidates = {"auto": ["root", "userns", "none"] if os.geteuid() == 0 else ["userns", "none"]}
        notes: list[str] = []
        chosen = None
        for mode in candidates.get(isolation, [isolation]):
            if mode == "none":
                chosen = mode
                break
            if mode == "root" and os.geteuid() != 0:
                notes.append("root: not running as root")
                continue
            res = _run_child(None, SandboxLimits(wall_time_s=20), mode, python, session=False, probe=True,
                             uid_base=_DEFAULT_UID_BASE, uid_count=_DEFAULT_UID_COUNT)
            if res.status == "ok":
                chosen = mode
                break
            notes.append(f"{mode}: {res.stderr.strip()[-300:]}")
        if chosen is None:
            raise RuntimeError(f"isolation {isolation!r} does not work on this machine: {notes}")
        info = IsolationInfo(chosen, "best-effort" if chosen == "none" else "namespace", tuple(notes))
        _probe_cache[key] = info
        return info


_DEFAULT_UID_BASE = 1_900_000_000  # above systemd's container uid range (up to 0x6FFF0000)
_DEFAULT_UID_COUNT = 4096


def _run_child(code: str | None, limits: SandboxLimits, mode: str, python: str, *, session: bool,
               probe: bool = False, uid_base: int, uid_count: int) -> SandboxResult:
    t0 = time.monotonic()
    child = _Child(code, limits, mode, python, uid_base=uid_base, uid_count=uid_count, session=session,
                   probe=probe)
    out = _Output(limits.max_output_bytes)
    try:
        outcome = _supervise(child, t0 + limits.wall_time_s, out, None)
        if outcome != "exited":
            child.kill()
        child.reap()
    finally:
        child.cleanup()
    stderr = out.text("stderr")
    status = outcome if outcome in ("timeout", "output_limit") else _status_from_exit(child, stderr)
    return SandboxResult(
        status=status, stdout=out.text("stdout"), stderr=stderr, exit_code=child.exit_code,
        wall_time_s=time.monotonic() - t0, cpu_time_s=child.cpu_time_s, output_truncated=out.over,
        isolation=mode, network_isolation="best-effort" if mode == "none" else "namespace")


def _check_code(code: object) -> str:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str of Python source, got {type(code).__name__}")
    if "\x00" in code:
        raise ValueError("code must not contain NUL characters")
    return code


def run_code(code: str, limits: SandboxLimits | None = None, *, isolation: str = "auto",
             python: str | None = None, uid_base: int = _DEFAULT_UID_BASE,
             uid_count: int = _DEFAULT_UID_COUNT) -> SandboxResult:
    """Runs code in a fresh sandboxed interpreter; never raises for anything the code does."""
    _check_code(code)
    limits = limits or SandboxLimits()
    python = python or sys.executable
    mode = probe_isolation(isolation, python).mode
    return _run_child(code, limits, mode, python, session=False, uid_base=uid_base, uid_count=uid_count)


def run_many(codes: Sequence[str], limits: SandboxLimits | None = None, *, max_workers: int | None = None,
             isolation: str = "auto", python: str | None = None) -> list[SandboxResult]:
    """Runs independent snippets concurrently (one process each, a thread pool supervising); results in order."""
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

    A snippet that times out, exceeds CPU or output, or kills the worker loses the session's state: its result
    has ``state_lost=True`` and the next snippet starts a fresh worker (``fresh_state=True``).
    Not thread-safe across concurrent ``run`` calls on one session (they are serialised by a lock).
    """

    def __init__(self, limits: SandboxLimits | None = None, *, isolation: str = "auto",
                 python: str | None = None, uid_base: int = _DEFAULT_UID_BASE,
                 uid_count: int = _DEFAULT_UID_COUNT) -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        self.info = probe_isolation(isolation, self.python)
        self._uid = (uid_base, uid_count)
        self._child: _Child | None = None
        self._fresh = True
        self._lock = threading.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._child is not None and not self._child.poll()

    def _start(self) -> _Child:
        child = _Child(None, self.limits, self.info.mode, self.python, uid_base=self._uid[0],
                       uid_count=self._uid[1], session=True)
        self._fresh = True
        return child

    def run(self, code: str) -> SandboxResult:
        _check_code(code)
        with self._lock:
            if self._closed:
                raise ValueError("this SandboxSession is closed")
            t0 = time.monotonic()
            if self._child is None or self._child.poll():
                self._discard()
                self._child = self._start()
            child, fresh = self._child, self._fresh
            self._fresh = False
            out, resp = _Output(self.limits.max_output_bytes), bytearray()
            data = code.encode("utf-8")
            try:
                os.write(child.ctrl_w, struct.pack("<I", len(data)))
                _write_all(child.ctrl_w, data, t0 + self.limits.wall_time_s)
                outcome = _supervise(child, t0 + self.limits.wall_time_s, out, resp)
            except (BrokenPipeError, TimeoutError):
                outcome = "exited"
            res = SandboxResult(status="ok", stdout="", stderr="", exit_code=None, wall_time_s=0.0,
                                isolation=self.info.mode, network_isolation=self.info.network_isolation,
                                fresh_state=fresh)
            if outcome == "response":
                msg = json.loads(bytes(resp[4:]).decode())
                res.status, res.exit_code = msg["status"], msg["exit_code"]
            else:
                child.kill()
                child.reap()
                stderr = out.text("stderr")
                res.status = outcome if outcome in ("timeout", "output_limit") else \
                    _status_from_exit(child, stderr)
                res.exit_code, res.cpu_time_s, res.state_lost = child.exit_code, child.cpu_time_s, True
                self._discard()
            res.stdout, res.stderr, res.output_truncated = out.text("stdout"), out.text("stderr"), out.over
            res.wall_time_s = time.monotonic() - t0
            return res

    def _discard(self) -> None:
        if self._child is not None:
            self._child.cleanup()
            self._child = None

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
        child = getattr(self, "_child", None)
        if child is not None:
            child.cleanup()


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        if time.monotonic() > deadline:
            raise TimeoutError("the sandbox worker did not read its snippet in time")
        n = os.write(fd, view)
        view = view[n:]


class SessionPool:
    """Sessions keyed by chain (e.g. (request, chain index)); runs one snippet per chain concurrently."""

    def __init__(self, limits: SandboxLimits | None = None, *, max_workers: int | None = None,
                 isolation: str = "auto", python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation, self.python = isolation, python
        probe_isolation(isolation, python)
        self._sessions: dict[Hashable, SandboxSession] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers or max(2, os.cpu_count() or 2),
                                        thread_name_prefix="prmkern-session")

    def session(self, key: Hashable) -> SandboxSession:
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = SandboxSession(self.limits, isolation=self.isolation, python=self.python)
            return self._sessions[key]

    def run(self, key: Hashable, code: str) -> SandboxResult:
        return self.session(key).run(code)

    def run_many(self, items: Sequence[tuple[Hashable, str]]) -> list[SandboxResult]:
        """items: (chain key, code); snippets of different chains run concurrently, results in order."""
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise TypeError(f"items must be a sequence of (key, code) pairs, got {type(items).__name__}")
        for it in items:
            if not (isinstance(it, tuple) and len(it) == 2):
                raise TypeError(f"each item must be a (key, code) tuple, got {it!r:.80}")
            _check_code(it[1])
        futures = [self._pool.submit(self.run, key, code) for key, code in items]
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
