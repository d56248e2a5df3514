"""Hostile snippets against prmkern.sandbox: each is contained, and each result names the limit that stopped it.

The containment tests that need the private-uid mode (signalling the engine, reading its /proc environ,
writing where root may write, fork bombs) run only where the sandbox gets isolation="root"; elsewhere they are
skipped with the reason. Limits are kept small so the file runs in a few seconds.
"""
import os
import signal
import socket
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
INFO = probe_isolation()
needs_root = pytest.mark.skipif(INFO.mode != "root", reason=f"sandbox isolation here is {INFO.mode!r}, not 'root'")


def test_plain_code_runs_and_reports_isolation():
    r = run_code("import math\nprint(math.factorial(10))", FAST)
    assert r.status == "ok" and r.ok and r.exit_code == 0
    assert r.stdout == "3628800\n"
    assert r.isolation == INFO.mode
    assert r.network_isolation == ("best-effort" if INFO.mode == "none" else "namespace")


def test_exception_is_error_with_traceback_of_the_code_only():
    r = run_code("x = 1\nraise ValueError('boom')", FAST)
    assert r.status == "error" and r.exit_code == 1
    assert "ValueError: boom" in r.stderr and '"<sandbox>", line 2' in r.stderr
    assert "_run" not in r.stderr  # bootstrap frames are not shown


def test_infinite_loop_stopped_by_cpu_limit():
    r = run_code("while True:\n    pass", FAST)
    assert r.status == "cpu_limit", r
    assert r.wall_time_s < FAST.wall_time_s


def test_sleeping_code_stopped_by_wall_clock():
    t0 = time.monotonic()
    r = run_code("import time\ntime.sleep(60)", SandboxLimits(wall_time_s=0.5))
    assert r.status == "timeout" and r.exit_code == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_cpu_limit_holds_when_sigxcpu_is_ignored():
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    r = run_code(code, FAST)
    assert r.status == "cpu_limit", r


def test_memory_hog_stopped_by_memory_limit():
    r = run_code("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))", FAST)
    assert r.status == "memory_limit", r
    assert "MemoryError" in r.stderr


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


@needs_root
def test_writes_outside_the_working_directory_do_not_land(tmp_path):
    name = "prmkern-escape-" + uuid.uuid4().hex
    targets = [tmp_path / name, f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", f"/root/{name}",
               f"{os.getcwd()}/{name}"]
    code = (
        "import os\n"
        f"for t in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        print('wrote', t)\n"
        "    except OSError as e:\n"
        "        print('refused', t, e.errno)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "print('cwd', os.getcwd(), open('inside.txt').read())\n"
    )
    r = run_code(code, FAST)
    assert r.status == "ok", r
    assert "fine" in r.stdout  # its own directory is writable
    for t in targets:
        assert not os.path.exists(t), f"sandboxed code created {t}"
    cwd = r.stdout.split("cwd ")[1].split()[0]
    assert not os.path.exists(cwd), "the working directory is removed afterwards"


def test_socket_connection_to_the_host_never_arrives():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.settimeout(1)\n"
        f"s.connect(('127.0.0.1', {port}))\n"
        "s.sendall(b'leak')\n"
        "print('connected')\n"
    )
    try:
        r = run_code(code, FAST)
        with pytest.raises(socket.timeout):
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()
    assert r.status == "error" and "connected" not in r.stdout
    expected = "Network is unreachable" if r.network_isolation == "namespace" else "network access is disabled"
    assert expected in r.stderr, r.stderr


@needs_root
def test_signalling_the_parent_and_the_test_process_does_nothing():
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {me}, -{os.getpgid(0)}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('sent', pid)\n"
        "    except OSError as e:\n"
        "        print('refused', pid, e.errno)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"  # every process it may signal: only its own namespace's
        "except ProcessLookupError:\n"
        "    pass\n"
        "print('still here', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    r = run_code(code, FAST)
    assert os.getpid() == me  # we are alive to assert it
    assert r.status == "ok" and "still here" in r.stdout, r
    # It lives in its own PID namespace under a private uid: the engine's pid is not there to be named, and
    # its parent is the namespace's init, running as root.
    assert "sent" not in r.stdout and r.stdout.count("refused") == 3
    visible = eval(r.stdout.split("still here ")[1])
    assert me not in visible or me < 3 and len(visible) <= 3


@needs_root
def test_fork_bomb_stopped_by_process_limit():
    r = run_code("import os\nwhile True:\n    os.fork()", FAST)
    assert r.status == "process_limit", r
    # Nothing of it survives: a second run under the same limits starts normally.
    assert run_code("print('alive')", FAST).stdout == "alive\n"


@needs_root
def test_fork_bomb_that_swallows_errors_is_killed_at_the_wall_clock():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_code(code, SandboxLimits(wall_time_s=1.0, cpu_time_s=1, max_processes=8))
    assert r.status in ("timeout", "cpu_limit"), r


@needs_root
def test_daemonised_child_is_killed_after_the_run(tmp_path):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(30)\n"
        "print(os.getuid())\n"
    )
    r = run_code(code, FAST)
    assert r.status == "ok"
    uid = r.stdout.strip()
    time.sleep(0.1)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == uid]
    assert not left, f"processes of the sandbox uid {uid} survived: {left}"


def _uid_of(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return line.split()[1]
    except OSError:
        return None
    return None


def test_session_keeps_state_and_reports_loss_after_a_kill():
    with SandboxSession(FAST) as s:
        a = s.run("total = 40\nprint('set')")
        b = s.run("total += 2\nprint(total)")
        assert (a.status, a.fresh_state) == ("ok", True)
        assert (b.status, b.stdout, b.fresh_state) == ("ok", "42\n", False)
        err = s.run("undefined_name")
        assert err.status == "error" and "NameError" in err.stderr and not err.state_lost
        assert s.run("print(total)").stdout == "42\n"  # an exception keeps the state
        killed = s.run("while True:\n    pass")
        assert killed.status == "cpu_limit" and killed.state_lost
        after = s.run("print(globals().get('total'))")
        assert (after.status, after.stdout, after.fresh_state) == ("ok", "None\n", True)
        big = s.run("print('z' * 10**6)")
        assert big.status == "output_limit" and big.state_lost


def test_session_snippets_have_their_own_cpu_allowance():
    with SandboxSession(SandboxLimits(wall_time_s=3.0, cpu_time_s=1)) as s:
        burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    pass\nprint('ok')"
        assert [s.run(burn).status for _ in range(3)] == ["ok", "ok", "ok"]


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


def test_best_effort_mode_blocks_sockets_with_the_audit_hook():
    r = run_code("import socket\nsocket.socket()", FAST, isolation="none")
    assert r.isolation == "none" and r.network_isolation == "best-effort"
    assert r.status == "error" and "network access is disabled" in r.stderr


def test_bad_input_is_rejected():
    with pytest.raises(TypeError):
        run_code(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SandboxLimits(wall_time_s=0)
    with pytest.raises(ValueError):
        run_code("print(1)", isolation="docker")
    with pytest.raises(TypeError):
        run_many("print(1)")
