"""prmkern.sandbox's contract: statuses and the limit each names, sessions, pools, bad input.

The hostile-snippet suite with host-side containment checks is tests/test_sandbox_hostile.py; the degraded
modes and venv detection are tests/test_sandbox_modes.py; quote_output is tests/test_sandbox_quoting.py.
Tests that need the private-uid mode run only where the sandbox gets isolation="root" (skipped with the reason
elsewhere). CPU-limit tests give the wall clock a wide margin: CI machines are shared and loaded.
"""
import dataclasses
import os
import signal
import time
import uuid

import pytest

from prmkern.sandbox import (
    SandboxLimits,
    SandboxSession,
    SessionPool,
    probe_isolation,
    run_code,
    run_many,
)

FAST = SandboxLimits(wall_time_s=3.0, cpu_time_s=1, memory_bytes=512 << 20, max_processes=8,
                     max_output_bytes=64 << 10, max_file_bytes=1 << 20)
CPU = SandboxLimits(wall_time_s=30.0, cpu_time_s=1, memory_bytes=512 << 20, max_processes=8,
                    max_output_bytes=64 << 10, max_file_bytes=1 << 20)
INFO = probe_isolation()


def test_plain_code_runs_and_reports_isolation():
    r = run_code("import math\nprint(math.factorial(10))", FAST)
    assert r.status == "ok" and r.ok and r.exit_code == 0
    assert r.stdout == "3628800\n"
    assert r.isolation == INFO.mode
    assert r.network_isolation == ("best-effort" if INFO.mode == "none" else "namespace")


def test_exception_is_error_with_traceback_of_the_code_only():
    r = run_code("x = 1\nraise ValueError('boom')", FAST)
    assert r.status == "error" and r.exit_code == 1
    assert "ValueError: boom" in r.stderr and '"<string>", line 2' in r.stderr  # exec of the string, as released
    assert r.exception == ("exception", "ValueError", "boom")
    assert "_run" not in r.stderr  # bootstrap frames are not shown


def test_infinite_loop_stopped_by_cpu_limit():
    r = run_code("while True:\n    pass", CPU)
    assert r.status == "cpu_limit" and r.error == "CPU time over 1s", r
    assert 1.0 <= r.cpu_time_s < 1.5  # the supervisor samples every 20 ms


def test_sleeping_code_stopped_by_wall_clock():
    t0 = time.monotonic()
    # It swallows the in-process interruption (TimeoutError), so the kill at the wall clock ends it.
    code = "import time\nwhile True:\n    try:\n        time.sleep(60)\n    except BaseException:\n        pass"
    r = run_code(code, SandboxLimits(wall_time_s=0.5))
    assert r.status == "timeout" and r.exit_code == -signal.SIGKILL and r.error == "wall clock over 0.5s"
    assert time.monotonic() - t0 < 5


def test_cpu_limit_holds_when_sigxcpu_is_ignored():
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    r = run_code(code, CPU)
    assert r.status == "cpu_limit", r


def test_memory_hog_stopped_by_memory_limit():
    # 64 MiB blocks take ~0.3 s each on a loaded machine: a wall clock and a CPU budget that cannot interrupt the
    # eight of them (with FAST's 1 s of CPU, zeroing them on a busy machine once ran out of CPU time first)
    r = run_code("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))",
                 dataclasses.replace(FAST, wall_time_s=10.0, cpu_time_s=8))
    assert r.status == "memory_limit", r
    assert "MemoryError" in r.stderr and "memory over" in r.error


def test_gigabyte_of_output_is_capped_and_killed():
    t0 = time.monotonic()
    r = run_code("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)", FAST)
    assert r.status == "output_limit" and r.output_truncated
    assert len(r.stdout) + len(r.stderr) == FAST.max_output_bytes
    assert time.monotonic() - t0 < 5


def test_output_from_background_child_is_capped_too():
    code = "import os, sys\nif os.fork() == 0:\n    while True:\n        os.write(2, b'y' * 4096)\n"
    r = run_code(code, FAST)
    # The main process exits at once; its leftover child is killed with it (or trips the cap first).
    assert r.status in ("ok", "output_limit")
    assert len(r.stderr) <= FAST.max_output_bytes


def test_parent_environment_secrets_are_not_visible(monkeypatch):
    secret = "prmkern-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("PRMKERN_TEST_SECRET", secret)
    code = (
        "import os\n"
        "print(sorted(os.environ.items()))\n"
        f"for pid in (os.getppid(), {os.getpid()}, 1):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('denied', pid, e.errno)\n"
    )
    r = run_code(code, FAST)
    assert r.status == "ok", r
    assert secret not in r.stdout and "PRMKERN_TEST_SECRET" not in r.stdout
    if INFO.mode == "root":
        assert r.stdout.count("denied") == 3


def test_session_keeps_state_and_reports_loss_after_a_kill():
    with SandboxSession(FAST) as s:
        a = s.run("total = 40\nprint('set')")
        b = s.run("total += 2\nprint(total)")
        assert (a.status, a.fresh_state) == ("ok", True)
        assert (b.status, b.stdout, b.fresh_state) == ("ok", "42\n", False)
        err = s.run("undefined_name")
        assert err.status == "error" and "NameError" in err.stderr and not err.state_lost
        assert s.run("print(total)").stdout == "42\n"  # an exception keeps the state
        slept = s.run("import time\ntime.sleep(60)")  # interrupted in-process (TimeoutError): the state stays
        assert slept.status == "timeout" and not slept.state_lost and slept.exception[0] == "timeout", slept
        assert s.run("print(total)").stdout == "42\n"
        killed = s.run("import time\nwhile True:\n    try:\n        time.sleep(60)\n    except BaseException:\n"
                       "        pass")  # it swallows the interruption: the wall clock's kill, the state is lost
        assert killed.status == "timeout" and killed.state_lost
        after = s.run("print(globals().get('total'))")
        assert (after.status, after.stdout, after.fresh_state) == ("ok", "None\n", True)
        big = s.run("print('z' * 10**6)")
        assert big.status == "output_limit" and big.state_lost


def test_session_snippets_have_their_own_cpu_allowance():
    with SandboxSession(SandboxLimits(wall_time_s=30.0, cpu_time_s=1)) as s:
        burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4:\n    pass\nprint('ok')"
        rs = [s.run(burn) for _ in range(3)]  # 1.2 s in all (over the limit), 0.4 s each (under it)
        assert [r.status for r in rs] == ["ok", "ok", "ok"] and not any(r.state_lost for r in rs)
        assert all(0.35 < r.cpu_time_s < 0.9 for r in rs), [r.cpu_time_s for r in rs]


def test_session_cpu_limit_sums_every_process_of_the_snippet():
    # Three processes burning 0.5 s each: none passes a per-process limit of 1 s, together they do.
    code = ("import os, time\n"
            "def burn():\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < 0.5:\n"
            "        pass\n"
            "pids = [os.fork() for _ in range(2)]\n"  # 1 + 1 + 2 processes: 4 of them burn
            "burn()\n"
            "for p in pids:\n"
            "    if p:\n"
            "        os.waitpid(p, 0)\n"
            "print('done', os.getpid())\n")
    with SandboxSession(CPU) as s:
        r = s.run(code)
    assert r.status == "cpu_limit" and r.state_lost, r


def test_results_name_what_happened():
    r = run_code("import sys\nsys.exit(3)", FAST)
    assert (r.status, r.exit_code, r.error) == ("error", 3, "the code exited with status 3")
    r = run_code("import os\nos.abort()", FAST)
    assert r.status == "killed" and r.error == "the code's process died of SIGABRT"
    assert run_code("print(1)", FAST).error is None


def test_run_many_is_concurrent_and_ordered():
    codes = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(6)]
    t0 = time.monotonic()
    rs = run_many(codes, FAST, max_workers=6)
    assert [r.stdout for r in rs] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - t0 < 0.4 * 6 * 0.7  # clearly overlapped


def test_session_pool_keeps_one_namespace_per_chain():
    with SessionPool(FAST, max_workers=4) as pool:
        pool.run_many([(c, f"x = {c}") for c in range(3)])
        rs = pool.run_many([(c, "print(x * 10)") for c in range(3)])
        assert [r.stdout for r in rs] == ["0\n", "10\n", "20\n"]


def test_bad_input_is_rejected():
    with pytest.raises(TypeError):
        run_code(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SandboxLimits(wall_time_s=0)
    with pytest.raises(ValueError):
        run_code("print(1)", isolation="docker")
    with pytest.raises(TypeError):
        run_many("print(1)")


def test_the_engine_keeps_no_descriptor_or_process_of_finished_sandboxes():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    def children():
        return [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == os.getpid()]

    run_code("print(1)", FAST)  # warm: probes and caches
    before = fds()
    others = set(children())  # children of earlier tests in this process (servers, workers) are not the sandbox's
    with SessionPool(FAST, max_workers=3) as pool:
        pool.run_many([(k, "import os\nif os.fork() == 0:\n    import time; time.sleep(9)\nprint(k := 1)")
                       for k in range(3)])
        pool.run_many([(0, "import time\ntime.sleep(9)"), (1, "print('z' * 10**6)"), (2, "raise SystemExit(4)")])
    run_many(["print(2)", "import time\ntime.sleep(9)"], SandboxLimits(wall_time_s=0.5))
    assert fds() == before
    assert set(children()) <= others


def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_whatever_the_code_string_holds_comes_back_as_a_result():
    cases = {"print(1)\x00": "SyntaxError", "x = '\ud800'\nprint(x)": "UnicodeEncodeError", "": None,
             "# pad\n" * 100_000 + "print('end')": None}
    for code, err in cases.items():
        r = run_code(code, FAST)
        if err is None:
            assert r.status == "ok" and r.stdout in ("", "end\n"), r
        else:
            assert r.status == "error" and err in r.error, r


def test_an_interpreter_under_tmp_is_not_hidden_by_the_private_tmp(tmp_path):
    """A venv in a checkout under /tmp (as a CI clone may be): the sandbox's private /tmp must not shadow it."""
    import subprocess
    import sys
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    r = run_code("import sys, subprocess\nprint(sys.prefix)\n"
                 "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True).stdout)",
                 FAST, python=python)
    assert r.status == "ok", r
    assert r.stdout.split() == [str(venv), "7"], r.stdout
