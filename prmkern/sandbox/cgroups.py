"""A control group per sandbox session (engine side): one memory bound for everything the session holds, and a
fair, capped share of the CPU.

RLIMIT_AS bounds each process's address space, not what a session keeps in the kernel: memfd and tmpfs pages,
SysV shared memory and inodes outlive any one process (the red team held +960 MiB of memfds and +1,000 MiB of
shm in a 256 MiB session). The memory controller charges all of these to the cgroup of the process that created
them, so one limit covers the session, processes and shared memory together. Where the host offers it:

* cgroup v2 (a cgroup2 mount whose engine cgroup hands "memory" to its children): memory.max = memory_bytes,
  memory.swap.max = 0, pids.max, cpu.weight 100 and cpu.max one CPU.
* cgroup v1 (memory and cpu hierarchies mounted and writable, as in many VMs and containers run as root):
  memory.limit_in_bytes (and memsw) = memory_bytes, pids.max where the pids hierarchy is there, cpu.shares 1024
  and a CFS quota of one CPU.

Each session's group sits under the engine's own group in each hierarchy, named prmkern-sbx-<uuid>, and is
removed when the session ends. The sandbox's first process joins it before it starts anything (child_supervisor's
``main``), so every process of the session is inside. ``Support.detect()`` says what works here and why not;
probe_isolation reports it. This module does not decide statuses (supervise.py reads ``events`` for that).
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field

_MOUNTS = "/proc/self/mounts"
CPU_PERIOD_US = 100_000


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, options) of the cgroup mounts."""
    out = []
    for line in (_read(_MOUNTS) or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (or "" for the v2 hierarchy) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for c in (controllers.split(",") if controllers else [""]):
            out[c] = path
    return out


@dataclass(frozen=True)
class Support:
    """What this host lets a session's cgroup enforce: version (2, 1 or 0 for none), the parent directory per
    controller where session groups are made, and why a stronger option was not taken."""

    version: int
    parents: dict[str, str] = field(default_factory=dict)  # "memory" / "cpu" / "pids" (v1), "" (v2) -> directory
    pids: bool = False
    notes: tuple[str, ...] = ()

    @property
    def memory(self) -> bool:
        return self.version in (1, 2)

    def describe(self) -> tuple[str, ...]:
        """Sentences for IsolationInfo.limits: what a session's memory and CPU are held to here."""
        if self.version == 2:
            return ("session memory: one cgroup v2 memory.max (memory_bytes) for all its processes, tmpfs files, "
                    "memfds, shared memory and kernel objects; no swap",
                    "CPU: each session its own cgroup v2 group, cpu.weight 100 (an equal share between sessions "
                    "whatever their process count) and cpu.max of one CPU",
                    *(("processes: cgroup v2 pids.max",) if self.pids else ()))
        if self.version == 1:
            return ("session memory: one cgroup v1 memory.limit_in_bytes (memory_bytes, memsw too) for all its "
                    "processes, tmpfs files, memfds, shared memory and kernel objects",
                    "CPU: each session its own cgroup v1 group, cpu.shares 1024 (an equal share between sessions "
                    "whatever their process count) and a CFS quota of one CPU",
                    *(("processes: cgroup v1 pids.max",) if self.pids else ()))
        return ()

    @staticmethod
    def detect() -> "Support":
        notes: list[str] = []
        own = _own_paths()
        mounts = _mounts()
        # cgroup v2 with the memory controller handed down to the engine's children
        for point, fstype, _ in mounts:
            if fstype != "cgroup2" or "" not in own:
                continue
            parent = os.path.join(point, own[""].lstrip("/"))
            ok, why = _v2_usable(parent)
            if ok:
                has_pids = "pids" in (_read(os.path.join(parent, "cgroup.subtree_control")) or "").split()
                return Support(2, {"": parent}, has_pids, tuple(notes))
            notes.append(f"cgroup v2 at {point}: {why}")
        # cgroup v1: memory and cpu hierarchies, each writable at the engine's group
        parents: dict[str, str] = {}
        for point, fstype, opts in mounts:
            if fstype != "cgroup":
                continue
            for ctl in ("memory", "cpu", "pids"):
                if ctl in opts and ctl in own and ctl not in parents:
                    parents[ctl] = os.path.join(point, own[ctl].lstrip("/"))
        if "memory" in parents and "cpu" in parents:
            ok, why = _v1_usable(parents)
            if ok:
                if "pids" in parents and not _v1_usable({"pids": parents["pids"]})[0]:
                    del parents["pids"]
                return Support(1, parents, "pids" in parents, tuple(notes))
            notes.append(f"cgroup v1: {why}")
        elif not any(f == "cgroup2" for _, f, _ in mounts):
            notes.append("no cgroup v1 memory+cpu hierarchies and no cgroup v2 mount")
        return Support(0, {}, False, tuple(notes))


def _v2_usable(parent: str) -> tuple[bool, str]:
    controllers = (_read(os.path.join(parent, "cgroup.controllers")) or "").split()
    if "memory" not in controllers or "cpu" not in controllers:
        return False, f"memory/cpu controllers not available to {parent} (has {controllers or 'none'})"
    enabled = (_read(os.path.join(parent, "cgroup.subtree_control")) or "").split()
    if "memory" not in enabled or "cpu" not in enabled:
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +cpu" + (
                " +pids" if "pids" in controllers else ""))
        except OSError as e:  # EBUSY: the engine's own group has processes (the no-internal-process rule)
            return False, (f"cannot enable memory/cpu for children of {parent} ({e.strerror}); run the engine in "
                           f"a delegated cgroup (e.g. systemd-run --user -p Delegate=yes)")
    probe = os.path.join(parent, f"prmkern-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return False, f"cannot create groups under {parent} ({e.strerror})"
    return True, ""


def _v1_usable(parents: dict[str, str]) -> tuple[bool, str]:
    name = f"prmkern-probe-{uuid.uuid4().hex[:12]}"
    for ctl, parent in parents.items():
        probe = os.path.join(parent, name)
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as e:
            return False, f"cannot create {ctl} groups under {parent} ({e.strerror})"
    return True, ""


_support: list[Support] = []
_support_lock = threading.Lock()


def current_support() -> Support:
    """Support.detect(), once per process (probe_isolation may turn it off with ``disable``)."""
    with _support_lock:
        if not _support:
            _support.append(Support.detect())
        return _support[0]


def disable(why: str) -> Support:
    """Sessions stop using cgroups here (the probe's sandbox could not join one); returns the new Support."""
    with _support_lock:
        old = _support[0] if _support else Support(0)
        _support[:] = [Support(0, {}, False, (*old.notes, why))]
        return _support[0]


class SessionGroup:
    """The group(s) of one sandbox: made with the limits set, joined by the sandbox's first process (it writes its
    pid to each of ``procs_files``; the worker to ``code_procs_files``), read for memory events, removed after
    the sandbox's processes are gone."""

    def __init__(self, support: Support, memory_bytes: int, max_processes: int) -> None:
        self.support = support
        name = f"prmkern-sbx-{uuid.uuid4().hex}"
        self.dirs: dict[str, str] = {}
        try:
            for ctl, parent in support.parents.items():
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.dirs[ctl] = path
            if support.version == 2:
                d = self.dirs[""]
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                _try_write(os.path.join(d, "memory.swap.max"), "0")
                _write(os.path.join(d, "cpu.weight"), "100")
                _write(os.path.join(d, "cpu.max"), f"{CPU_PERIOD_US} {CPU_PERIOD_US}")
                if support.pids:
                    _write(os.path.join(d, "pids.max"), str(max_processes + 2))
            else:
                m = self.dirs["memory"]
                _write(os.path.join(m, "memory.limit_in_bytes"), str(memory_bytes))
                _try_write(os.path.join(m, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                c = self.dirs["cpu"]
                _write(os.path.join(c, "cpu.shares"), "1024")
                _write(os.path.join(c, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                _write(os.path.join(c, "cpu.cfs_quota_us"), str(CPU_PERIOD_US))
                if "pids" in self.dirs:
                    _write(os.path.join(self.dirs["pids"], "pids.max"), str(max_processes + 2))
        except BaseException:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        """Joined by the sandbox's first process (all of the session: supervisor, worker, the code's)."""
        return [os.path.join(d, "cgroup.procs") for ctl, d in self.dirs.items() if ctl != "cpu"]

    @property
    def code_procs_files(self) -> list[str]:
        """Joined by the worker alone (cgroup v1's cpu group): the supervisor stays out of the one-CPU quota it
        would otherwise share with the code's burners, so it keeps deciding limits on time. cgroup v2 has one
        hierarchy; there the supervisor shares the session's group."""
        return [os.path.join(self.dirs["cpu"], "cgroup.procs")] if "cpu" in self.dirs else []

    def memory_events(self) -> int:
        """How many times the session's memory hit its limit (allocation failures and OOM kills), so far."""
        if self.support.version == 2:
            text = _read(os.path.join(self.dirs[""], "memory.events")) or ""
            counts = dict(line.split() for line in text.splitlines() if line.strip())
            return int(counts.get("max", 0)) + int(counts.get("oom_kill", 0))
        m = self.dirs.get("memory")
        if m is None:
            return 0
        total = 0
        for name in ("memory.failcnt", "memory.memsw.failcnt"):
            value = _read(os.path.join(m, name))
            total += int(value) if value and value.strip().isdigit() else 0
        oom = (_read(os.path.join(m, "memory.oom_control")) or "").split()  # "... oom_kill N" (failcnt can stay 0)
        if "oom_kill" in oom and oom.index("oom_kill") + 1 < len(oom) and oom[oom.index("oom_kill") + 1].isdigit():
            total += int(oom[oom.index("oom_kill") + 1])
        return total

    def memory_bytes(self) -> tuple[int, int]:
        """(current, peak) bytes charged to the session (0 where the file is missing)."""
        if self.support.version == 2:
            names = ("memory.current", "memory.peak")
            d = self.dirs[""]
        else:
            names = ("memory.usage_in_bytes", "memory.max_usage_in_bytes")
            d = self.dirs["memory"]
        vals = [(_read(os.path.join(d, n)) or "0").strip() for n in names]
        return tuple(int(v) if v.isdigit() else 0 for v in vals)  # type: ignore[return-value]

    def remove(self) -> None:
        """rmdir of each group; retried briefly while the last processes are being reaped. A group that still has
        processes (it should not: the sandbox is torn down first) is left, and named in the exception."""
        left = []
        for path in self.dirs.values():
            for attempt in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if attempt == 49:
                        left.append(path)
                    time.sleep(0.01)
        self.dirs = {}
        if left:
            raise OSError(f"sandbox cgroups still busy, left in place: {left}")


def _try_write(path: str, value: str) -> None:
    try:
        _write(path, value)
    except OSError:
        pass  # e.g. no swap accounting: the memory limit alone holds
