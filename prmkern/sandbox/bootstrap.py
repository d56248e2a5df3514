"""The program the sandbox's interpreter runs, and its configuration (engine side).

The child program is the concatenation of child_setup.py, child_worker.py and child_supervisor.py (kept as
real files so they read and lint as code) plus a call to ``main``; it runs under ``python -I -u -c`` with
the JSON configuration built here in argv[1]. The configuration holds no secret: the pipes it names are held
by the supervisor alone, and per-snippet tokens are drawn by the supervisor.
"""
from __future__ import annotations

from pathlib import Path

from prmkern.sandbox.config import SandboxLimits

EXIT_SETUP, EXIT_MEMORY, EXIT_NPROC, EXIT_CHANNEL = 85, 86, 87, 88
SETUP_MSG = "prmkern-sandbox-setup-failed"
SANDBOX_GID = 65534  # nogroup / nobody
WORKDIR = "/tmp"  # inside the namespace modes' root: a private tmpfs, the code's cwd, HOME and TMPDIR

_PARTS = ("child_setup.py", "child_worker.py", "child_supervisor.py")
_program: list[str] = []


def program() -> str:
    if not _program:
        here = Path(__file__).parent
        _program.append("\n".join(here.joinpath(p).read_text() for p in _PARTS) + "\nmain()\n")
    return _program[0]


def child_config(limits: SandboxLimits, mode: str, *, uid: int, newroot: str, workdir: str, fs: list,
                 nproc: int, req_fd: int, rep_fd: int, life_fd: int | None, cgroup_procs: list[str],
                 cgroup_code_procs: list[str]) -> dict:
    """The JSON the child reads. ``nproc``: RLIMIT_NPROC (the allowance plus, outside root mode, the
    processes the engine's user already has). ``cgroup_procs``: the session's cgroup.procs files, joined first;
    without them, memfds and SysV shared memory are refused (seccomp) since nothing would bound them.
    ``cgroup_code_procs``: opened first too, written by the worker alone (its CPU group)."""
    cpu = limits.cpu_time_s
    rl = {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_FSIZE": limits.max_file_bytes,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
        # The supervisor enforces cpu_time_s per snippet over all processes; RLIMIT_CPU is each process's
        # backstop (the worker re-arms its soft limit per snippet; the hard limit bounds a whole session).
        "RLIMIT_CPU": [cpu + 2, max(cpu * 100, 600)],
    }
    return {
        "mode": mode, "uid": uid, "gid": SANDBOX_GID, "newroot": newroot, "workdir": workdir, "fs": fs,
        "tmpfs_bytes": limits.max_file_bytes, "tmpfs_inodes": limits.max_tmpfs_files, "limits": rl,
        "cpu_per_snippet": cpu, "interrupt_s": limits.interrupt_after_s,
        "wall_per_snippet": float(limits.wall_time_s), "memory_bytes": limits.memory_bytes,
        "max_processes": limits.max_processes, "cgroup_procs": list(cgroup_procs),
        "cgroup_code_procs": list(cgroup_code_procs),
        "deny_shared_memory": not cgroup_procs, "shm_bytes": limits.max_file_bytes,
        "setup_msg": SETUP_MSG, "exit_setup": EXIT_SETUP, "exit_memory": EXIT_MEMORY, "exit_nproc": EXIT_NPROC,
        "exit_channel": EXIT_CHANNEL, "req_fd": req_fd, "rep_fd": rep_fd, "life_fd": life_fd,
    }
