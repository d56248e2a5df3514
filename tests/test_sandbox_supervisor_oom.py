"""How a snippet's end is reported when the sandbox's supervisor itself dies (prmkern/sandbox/supervise.py): killed
by SIGKILL while the session's memory cgroup counted an OOM kill is "memory_limit" (the kernel's OOM killer took the
supervisor too, which a full test suite's load made happen once in a memfd hog), anything else "sandbox_error".
The process is a stand-in whose cgroup and exit status are set by the test; the pipes are not used."""
from __future__ import annotations

import signal

import pytest

from prmkern.sandbox import supervise
from prmkern.sandbox.config import SandboxLimits, SandboxResult


class _Group:
    def __init__(self, events_during_snippet: int):
        self.reads = [0, events_during_snippet]  # before the snippet, after it

    def memory_events(self) -> int:
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


class _DeadSupervisor:
    mode = "root"

    def __init__(self, exit_code: int, events: int):
        self.exit_code, self.group = exit_code, _Group(events)

    def reap(self) -> None:
        pass

    def poll(self) -> bool:
        return True


@pytest.fixture
def ended_without_reply(monkeypatch):
    monkeypatch.setattr(supervise, "_send", lambda proc, data, deadline: True)
    monkeypatch.setattr(supervise, "_pump", lambda proc, deadline, out, reply: "exited")

    def run(exit_code: int, events: int) -> SandboxResult:
        blank = SandboxResult(status="sandbox_error", stdout="", stderr="", exit_code=None, wall_time_s=0.0)
        return supervise.execute(_DeadSupervisor(exit_code, events), "x = 1", SandboxLimits(), blank)
    return run


def test_supervisor_killed_by_the_oom_killer_is_a_memory_limit(ended_without_reply):
    res = ended_without_reply(-signal.SIGKILL, 1)
    assert res.status == "memory_limit" and res.state_lost, res
    assert "memory cgroup" in res.error and "supervisor" in res.error, res.error


@pytest.mark.parametrize("exit_code,events", [(-signal.SIGKILL, 0), (-signal.SIGSEGV, 1), (1, 1)])
def test_other_supervisor_deaths_stay_sandbox_errors(ended_without_reply, exit_code, events):
    res = ended_without_reply(exit_code, events)
    assert res.status == "sandbox_error" and res.state_lost, res
    assert f"exit status {exit_code}" in res.error, res.error
