"""Running model-written Python code outside the engine's process, contained.

A verifier such as GenPRM writes Python to check a step; that code is untrusted. It runs in a separate
interpreter (``python -I``, a fixed minimal environment), inside namespaces, under limits, and reports through
a supervisor it cannot reach. The package, one concern per file:

* ``config``: SandboxLimits, SandboxResult, IsolationInfo, the statuses, what each mode does not isolate.
* ``session``: the public entry points (probe_isolation, run_code, run_many, SandboxSession, SessionPool).
* ``supervise``: one snippet, engine side: send, pump output, wall clock, output cap, defensive reply parse.
* ``process``: starting and tearing down one sandbox process tree; private uids.
* ``fsview``: the minimal filesystem view (the interpreter's own paths, asked of the interpreter).
* ``bootstrap``: the child program and its configuration; ``child_setup`` / ``child_worker`` /
  ``child_supervisor`` are that program (namespaces and mounts; the worker running the code; the supervisor).
* ``quoting``: quote_output, so code output pasted into a chain cannot be read as a verdict.

Isolation modes (``isolation="auto"`` picks the strongest that works here; every result says which ran and
``not_isolated`` lists what it leaves open): "root" (new mount, PID, network, IPC and UTS namespaces, a
pivot_root into a minimal read-only view, a private uid per sandbox), "userns" (the same inside an
unprivileged user namespace, the engine's uid), "none" (limits, scrubbed environment, a child-subreaper
supervisor; see NOT_ISOLATED["none"]). Every mode adds a seccomp filter (sockets of UNIX / IPv4 / IPv6 only).
Linux only. docs/sandbox.md has the details and the requirements.
"""
from prmkern.sandbox.config import (
    ISOLATION_MODES,
    NOT_ISOLATED,
    STATUSES,
    IsolationInfo,
    SandboxLimits,
    SandboxResult,
)
from prmkern.sandbox.fsview import interpreter_paths, is_venv
from prmkern.sandbox.quoting import quote_output
from prmkern.sandbox.session import SandboxSession, SessionPool, probe_isolation, run_code, run_many

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "SandboxSession",
    "SessionPool",
    "IsolationInfo",
    "probe_isolation",
    "run_code",
    "run_many",
    "quote_output",
    "interpreter_paths",
    "is_venv",
    "STATUSES",
    "ISOLATION_MODES",
    "NOT_ISOLATED",
]
