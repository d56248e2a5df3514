"""The sandbox's public data: limits in, results out, what the isolation mode does and does not isolate."""
from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = (
    "ok",  # the snippet ran to its end (exit status 0)
    "error",  # the code raised or exited non-zero
    "timeout",  # wall clock less the time spent waiting for a CPU (a neighbour cannot cause it): interrupted
    # in-process (TimeoutError, state kept) or, as the backstop, killed by us
    "cpu_limit",  # CPU seconds of all its processes over the per-snippet limit (or RLIMIT_CPU)
    "memory_limit",  # the session's memory cgroup hit memory_bytes, or MemoryError near RLIMIT_AS (verified)
    "output_limit",  # stdout+stderr passed the cap: killed by us
    "process_limit",  # RLIMIT_NPROC: fork/thread creation refused and not handled
    "killed",  # died of another signal (a crash)
    "protocol_error",  # the code forged, garbled, closed or stopped the worker's reply channel
    "sandbox_error",  # the sandbox itself could not be set up or failed (not the code's doing)
)
ISOLATION_MODES = ("auto", "root", "userns", "none")

# What each mode leaves open, as reported on IsolationInfo.not_isolated and every result. Root mode isolates
# everything this package knows how to isolate; the others say exactly what they give up.
NOT_ISOLATED: dict[str, tuple[str, ...]] = {
    "root": (),
    "userns": (
        "uid: the code runs as the engine's user inside a user namespace (only the files of the minimal "
        "filesystem view are visible, but those it may read and the tmpfs it may fill are the engine user's)",
        "process count: RLIMIT_NPROC counts every process of the engine's user, so the allowance is "
        "approximate",
    ),
    "none": (
        "filesystem: every file the code's uid can read is readable (the engine's uid; as root, a private uid "
        "that still reads every world-readable file), and world-writable places are writable",
        "network: IPv4, IPv6 and UNIX sockets are blocked only by an audit hook in the interpreter (ctypes or "
        "a subprocess get around it); other families are refused by seccomp as in every mode",
        "IPC: SysV shared memory, semaphores and message queues are the host's and outlive the run",
        "processes: the code sees every process of the host; unless the engine runs as root (then the code "
        "has a private uid) it may signal the engine user's processes, the supervisor included, and what it "
        "started in a new session can then outlive the run",
        "process count: without root, RLIMIT_NPROC counts the engine user's processes (approximate allowance)",
    ),
}

# Added to mode none's list when the engine is root but the interpreter's files are closed to other users
# (e.g. a Python under /root, mode 0700): no private uid could run it, so the code keeps root.
ROOT_CODE_GAP = ("uid: the code runs as root (the interpreter's directories are not readable by other users, "
                 "so it cannot run under a private uid without a mount namespace)")

# GenPRM's CodeExecutor (genprm_inference.py L52): `with timeout(seconds=5)`, a signal.alarm(5).
RELEASED_ALARM_S = 5.0

# Where child_setup.install_seccomp knows the syscall numbers; elsewhere the missing filter is reported.
SECCOMP_MACHINES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run (or per-snippet, in a session) limits. Sizes in bytes, times in seconds."""

    # Wall clock of one snippet, not counting the time its processes waited for a CPU (run-queue delay): a busy
    # neighbour slows a snippet down but cannot make it time out. Real time is capped at HARD_WALL_FACTOR times it.
    wall_time_s: float = 10.0
    cpu_time_s: int = 10  # CPU of every process the snippet runs, summed
    # The whole session's memory where a memory cgroup exists (processes, tmpfs files, memfds, shared memory,
    # kernel objects together); RLIMIT_AS of each process everywhere. IsolationInfo.limits says which hold here.
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE, and the size of each private tmpfs (/tmp, /dev/shm)
    max_open_files: int = 256
    # Wall-clock seconds after which TimeoutError("Code execution timed out") is raised inside the snippet (GenPRM's
    # signal.alarm): the session's namespace survives. None: the release's 5 s, or wall_time_s minus min(0.5 s, 10%)
    # when that is sooner, so the interruption comes before the kill at wall_time_s (the backstop, losing the state).
    interrupt_s: float | None = None
    max_tmpfs_files: int = 4096  # inodes of each private tmpfs (empty files cost kernel memory too)

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s", "memory_bytes", "max_processes", "max_output_bytes",
                     "max_file_bytes", "max_open_files", "max_tmpfs_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.interrupt_s is not None and (isinstance(self.interrupt_s, bool) or not isinstance(
                self.interrupt_s, (int, float)) or not 0 < self.interrupt_s):
            raise ValueError(f"SandboxLimits.interrupt_s must be None or a positive number, got {self.interrupt_s!r}")
        if not isinstance(self.cpu_time_s, int):
            raise TypeError(f"SandboxLimits.cpu_time_s must be an int (whole seconds), got {self.cpu_time_s!r}")

    @property
    def interrupt_after_s(self) -> float:
        """When the snippet is interrupted in-process (see interrupt_s)."""
        if self.interrupt_s is not None:
            return float(self.interrupt_s)
        return min(RELEASED_ALARM_S, self.wall_time_s - min(0.5, 0.1 * self.wall_time_s))


HARD_WALL_FACTOR = 4  # a snippet starved of CPU by others still ends after this many times wall_time_s


@dataclass
class SandboxResult:
    """What one run (or one session snippet) produced and why it stopped."""

    status: str  # one of STATUSES
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: no exit status (snippet cut off)
    wall_time_s: float
    cpu_time_s: float | None = None  # user+system of every process of the snippet, when known
    output_truncated: bool = False
    isolation: str = "none"  # "root" | "userns" | "none"
    network_isolation: str = "best-effort"  # "namespace" | "best-effort"
    state_lost: bool = False  # session: the worker was replaced, its globals are gone
    fresh_state: bool = True  # session: this snippet ran in a new, empty namespace
    error: str | None = None  # what happened, for every status but "ok"
    killed_processes: int = 0  # processes the snippet left running, killed before this result was returned
    not_isolated: tuple[str, ...] = ()  # what this run's isolation mode does not isolate (NOT_ISOLATED)
    # What escaped the snippet, verbatim: (kind, type name, str(exception)[:8000]); kind "timeout" (a TimeoutError,
    # the in-process interruption's included), "exception" or "base" (SystemExit and other BaseExceptions). None
    # when nothing escaped or the snippet was killed.
    exception: tuple[str, str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class IsolationInfo:
    """What the sandbox can do on this machine."""

    mode: str  # "root" | "userns" | "none"
    network_isolation: str  # "namespace" | "best-effort"
    notes: tuple[str, ...] = field(default_factory=tuple)  # why stronger modes were not chosen
    not_isolated: tuple[str, ...] = field(default_factory=tuple)
    # How a session's resources are held on this host: "cgroup2" | "cgroup1" | "rlimits" (no usable cgroup), and
    # one sentence per limit that is enforced (memory, CPU share, timeouts, tmpfs, shared memory).
    resource_control: str = "rlimits"
    limits: tuple[str, ...] = field(default_factory=tuple)
