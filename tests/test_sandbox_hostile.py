"""Hostile snippets: every category is contained, and the containment is checked from the HOST side.

Categories: forging or breaking the reply channel; SysV IPC outliving the run or connecting sandboxes;
processes, threads and timers outliving their snippet (time bombs, background CPU burners, fork bombs); host
UNIX sockets; reading host files (passwd, the project, model weights, home); the network; writing outside
the private /tmp; huge output; memory. Host-side checks: processes of the sandbox's uid (root mode), the host's
/proc/sysvipc tables, host files and sockets, and the next snippet's output being exactly its own.
Tests of the private-uid / filesystem-view guarantees need isolation "root" and are skipped elsewhere.
"""
import json
import os
import socket
import sys
import uuid

import pytest

from prmkern.sandbox import SandboxLimits, SandboxSession, SessionPool, probe_isolation, run_code
from prmkern.sandbox.fsview import fs_plan

FAST = SandboxLimits(wall_time_s=5.0, cpu_time_s=2, memory_bytes=512 << 20, max_processes=12,
                     max_output_bytes=64 << 10, max_file_bytes=1 << 20)
INFO = probe_isolation()
needs_root = pytest.mark.skipif(INFO.mode != "root", reason=f"sandbox isolation here is {INFO.mode!r}, not 'root'")
needs_ns = pytest.mark.skipif(INFO.mode == "none", reason="no namespaces here (isolation 'none')")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _live_processes_of(uid: int) -> list[str]:
    """Host pids (not zombies) whose real uid is `uid`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            out.append(pid)
    return out


def _assert_next_snippet_clean(session: SandboxSession, wait_s: float = 0.6) -> None:
    """A later snippet's output is exactly its own: nothing of the previous one writes into it."""
    r = session.run(f"import time\ntime.sleep({wait_s})\nprint('clean')")
    assert (r.status, r.stdout, r.stderr) == ("ok", "clean\n", ""), r


def _mode_or_skip(mode: str) -> None:
    if mode == "root" and os.geteuid() != 0:
        pytest.skip("root mode needs root")
    try:
        probe_isolation(mode)
    except RuntimeError as e:
        pytest.skip(f"isolation {mode!r} does not work here: {e}")


# -- the reply channel ------------------------------------------------------------------------------------------

FORGERIES = {
    # Frames in the reply format, with a guessed token, written to every descriptor the code has.
    "frames_on_every_fd": (
        "import os, struct, json\n"
        "msg = json.dumps({'token': '0' * 32, 'status': 'ok', 'exit_code': 0}).encode()\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.write(fd, struct.pack('<I', len(msg)) + msg)\n"
        "    except OSError:\n"
        "        pass\n"
        "raise SystemExit(5)\n"),
    "garbage_on_every_fd": (
        "import os\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.write(fd, b'\\xff' * 70000)\n"
        "    except OSError:\n"
        "        pass\n"),
    "close_every_fd": "import os\nos.closerange(0, 4096)\n",
    "devnull_over_every_fd": (
        "import os\nn = os.open('/dev/null', os.O_RDWR)\n"
        "for fd in range(0, 256):\n"
        "    if fd != n:\n"
        "        try:\n"
        "            os.dup2(n, fd)\n"
        "        except OSError:\n"
        "            pass\n"),
    "replace_the_serialisers": (
        "import json, os, struct\n"
        "json.dumps = lambda *a, **k: '{\"status\": \"ok\"'\n"
        "json.loads = lambda *a, **k: None\n"
        "struct.pack = lambda *a: b'\\xff\\xff\\xff\\x7f'\n"
        "os.write = lambda fd, data: len(data)\n"),
    "stop_itself": "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
    "exit_hard": "import os\nos._exit(0)\n",
    "kill_the_supervisor": (
        "import os, signal\n"
        "for pid in (1, os.getppid()):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"),
    "argv_and_environment": (
        "import sys, os\n"
        "print(sys.argv, sorted(os.environ))\n"
        "for a in sys.argv:\n"
        "    for tok in a.replace(',', ' ').replace(':', ' ').split():\n"
        "        if tok.strip('\"[]{} ').isdigit():\n"
        "            try:\n"
        "                os.write(int(tok.strip('\"[]{} ')), b'{}')\n"
        "            except OSError:\n"
        "                pass\n"),
}


@pytest.mark.parametrize("mode", ["auto", "userns", "none"])
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forging_or_breaking_the_reply_channel_fails_that_snippet_alone(name, mode):
    if mode != "auto":
        _mode_or_skip(mode)
    code = FORGERIES[name]
    with SessionPool(FAST, max_workers=2, isolation=mode) as pool:
        pool.run_many([("evil", "secret = 41"), ("good", "total = 1")])
        evil, good = pool.run_many([("evil", code), ("good", "total += 1\nprint('good', total)")])
        # No exception reached us; the other chain is untouched; the hostile one got a verdict of its own.
        assert (good.status, good.stdout) == ("ok", "good 2\n"), good
        assert evil.status in ("ok", "error", "protocol_error", "killed"), evil
        if evil.status != "ok":
            assert evil.error, evil
        if name in ("frames_on_every_fd", "garbage_on_every_fd", "close_every_fd", "stop_itself"):
            assert evil.status == "protocol_error" and evil.state_lost, evil
        if name == "frames_on_every_fd":
            assert "forged" in evil.error or "beyond one report" in evil.error, evil
        # The chain's session goes on: a next snippet runs normally, with or without the old state.
        after = pool.run("evil", "print('next', globals().get('secret'))")
        assert after.status == "ok" and after.stdout in ("next 41\n", "next None\n"), after
        assert after.stdout == ("next None\n" if evil.state_lost else "next 41\n")
        assert pool.run("good", "print(total)").stdout == "2\n"


@pytest.mark.parametrize("mode", ["root", "userns"])
def test_the_supervisors_pipes_are_out_of_reach(mode):
    _mode_or_skip(mode)
    code = (
        "import os\n"
        "opened = []\n"
        "for pid in ('1', str(os.getppid())):\n"
        "    try:\n"
        "        fds = os.listdir(f'/proc/{pid}/fd')\n"  # listing the numbers may be allowed (userns)
        "    except OSError:\n"
        "        fds = [str(n) for n in range(64)]\n"
        "    for what in [f'fd/{n}' for n in fds] + ['mem', 'environ']:\n"
        "        for flags in (os.O_WRONLY, os.O_RDONLY):\n"
        "            try:\n"
        "                os.close(os.open(f'/proc/{pid}/{what}', flags))\n"
        "                opened.append((pid, what))\n"
        "            except OSError:\n"
        "                pass\n"
        "import signal\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):\n"
        "    try:\n"
        "        os.kill(1, sig)\n"  # the supervisor: init of the namespace, another uid or userns
        "    except OSError:\n"
        "        pass\n"
        "print(sorted(set(opened)))\n"
    )
    with SandboxSession(FAST, isolation=mode) as s:
        r = s.run(code)
        assert (r.status, r.stdout, r.state_lost) == ("ok", "[]\n", False), r
        assert s.run("print('still served')").stdout == "still served\n"


def test_reply_look_alikes_on_stdout_are_just_output():
    fake = json.dumps({"event": "done", "status": "ok", "exit_code": 0, "cpu": 0.0, "state_lost": False,
                       "killed_processes": 0})
    code = f"import sys, struct\nsys.stdout.buffer.write(struct.pack('<I', {len(fake)}) + {fake.encode()!r})\n" \
           "raise ValueError('really failed')"
    r = run_code(code, FAST)
    assert r.status == "error" and "ValueError: really failed" in r.error and fake in r.stdout


# -- SysV IPC ---------------------------------------------------------------------------------------------------

_IPC = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "key, create = {key}, {create}\n"
    "flags = (0o1000 | 0o666) if create else 0\n"  # IPC_CREAT
    "print(libc.shmget(key, 4096 if create else 0, flags), libc.msgget(key, flags),\n"
    "      libc.semget(key, 1 if create else 0, flags))\n"
)


def _host_ipc_keys() -> set[int]:
    keys = set()
    for table in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{table}") as f:
            next(f)
            keys |= {int(line.split()[0]) for line in f if line.strip()}
    return keys


@needs_ns
def test_sysv_ipc_does_not_outlive_the_run_or_connect_sandboxes():
    key = int(uuid.uuid4().int % (1 << 30)) + 1
    with SandboxSession(FAST) as a, SandboxSession(FAST) as b:
        made = a.run(_IPC.format(key=key, create=True))
        assert made.status == "ok" and "-1" not in made.stdout.split(), made  # created inside
        assert key not in _host_ipc_keys()  # ... but not on the host
        seen = b.run(_IPC.format(key=key, create=False))  # another live sandbox cannot find them
        assert seen.stdout.split() == ["-1", "-1", "-1"], seen
        again = a.run(_IPC.format(key=key, create=False))  # the same session still has them
        assert "-1" not in again.stdout.split(), again
    assert run_code(_IPC.format(key=key, create=False), FAST).stdout.split() == ["-1", "-1", "-1"]
    assert key not in _host_ipc_keys()  # (other processes on the host may create their own objects meanwhile)


# -- processes, threads and timers outliving their snippet -----------------------------------------------------

LEFTOVERS = {
    "forked_time_bomb": ("import os, time\n"
                         "if os.fork() == 0:\n    time.sleep(0.3)\n    print('BOOM')\n    os._exit(0)\n"),
    "daemonised_double_fork": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.3)\n"
        "        os.write(1, b'BOOM')\n"
        "    os._exit(0)\n"),
    "thread_time_bomb": ("import threading, time\n"
                         "threading.Thread(target=lambda: (time.sleep(0.3), print('BOOM'))).start()\n"),
    "daemon_thread_burner": ("import threading\n"
                             "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"),
    "forked_burner": "import os\nif os.fork() == 0:\n    while True:\n        pass\n",
    "subprocess_sleeper": (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3); print(\"BOOM\")'])\n"),
    "idle_thread_pool": ("from concurrent.futures import ThreadPoolExecutor\n"
                         "pool = ThreadPoolExecutor(2)\npool.submit(int).result()\n"),
    "alarm_time_bomb": (
        "import signal\n"
        "signal.signal(signal.SIGALRM, lambda *a: print('BOOM'))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"),
}


@pytest.mark.parametrize("name", sorted(LEFTOVERS))
def test_nothing_a_snippet_started_runs_after_its_result(name):
    with SandboxSession(FAST) as s:
        r = s.run("import os\nprint(os.getuid(), flush=True)\n" + LEFTOVERS[name])
        assert r.status == "ok", r
        uid = int(r.stdout.split()[0])
        if INFO.mode == "root":
            # At the moment the result is back, the only live process of the sandbox's uid is the stopped worker
            # (or none, when the worker was replaced because a thread was left).
            live = _live_processes_of(uid)
            assert len(live) <= (0 if r.state_lost else 1), (live, r)
        if name in ("thread_time_bomb", "daemon_thread_burner", "idle_thread_pool"):
            assert r.state_lost and "thread" in r.error, r  # a thread cannot be killed alone: the worker goes
        if name in ("forked_time_bomb", "daemonised_double_fork", "forked_burner", "subprocess_sleeper"):
            assert r.killed_processes >= 1 and not r.state_lost, r
        _assert_next_snippet_clean(s)


@needs_root
@pytest.mark.parametrize("ending", ["timeout", "output_limit", "cpu_limit"])
def test_a_snippet_cut_off_by_a_limit_leaves_no_process(ending):
    tail = {"timeout": "time.sleep(60)", "output_limit": "while True:\n    print('x' * 4096)",
            "cpu_limit": "while True:\n    pass"}[ending]
    code = ("import os, threading, time\nprint(os.getuid(), flush=True)\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        time.sleep(60)\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n" + tail)
    limits = SandboxLimits(wall_time_s=20.0 if ending == "cpu_limit" else 1.5, cpu_time_s=1, max_processes=12,
                           max_output_bytes=64 << 10)
    with SandboxSession(limits) as s:
        r = s.run(code)
        assert r.status == ending and r.state_lost, r
        assert _live_processes_of(int(r.stdout.split()[0])) == []
        _assert_next_snippet_clean(s, wait_s=0.1)


@needs_root
def test_fork_bomb_leaves_nothing_behind():
    code = ("import os\nprint(os.getuid(), flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    r = run_code(code, SandboxLimits(wall_time_s=2.0, cpu_time_s=1, max_processes=12))
    assert r.status in ("timeout", "cpu_limit", "process_limit"), r
    assert _live_processes_of(int(r.stdout.split()[0])) == []
    assert run_code("print('alive')", FAST).stdout == "alive\n"


# -- host files, sockets and network ---------------------------------------------------------------------------

@needs_ns
def test_host_files_are_not_in_the_sandboxs_view(tmp_path):
    secret = "prmkern-secret-" + uuid.uuid4().hex
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "prmkern-test-" + uuid.uuid4().hex)
    os.makedirs(home_cache)
    weights = os.path.join(home_cache, "model.safetensors")
    world = tmp_path / "world-readable.txt"
    try:
        for path in (weights, str(world)):
            with open(path, "w") as f:
                f.write(secret)
            os.chmod(path, 0o644)
        os.chmod(home_cache, 0o755)
        os.chmod(tmp_path, 0o755)
        targets = ["/etc/passwd", "/etc/shadow", os.path.join(REPO, "README.md"), os.path.join(REPO, "setup.py"),
                   weights, str(world), "/proc/1/root/etc/passwd", "/proc/self/root/etc/passwd"]
        code = (
            f"targets = {targets!r}\n"
            "for t in targets:\n"
            "    try:\n"
            "        print('OPENED', t, open(t).read()[:200])\n"
            "    except OSError as e:\n"
            "        print('denied', t, type(e).__name__)\n"
        )
        r = run_code(code, FAST)
    finally:
        os.remove(weights)
        os.rmdir(home_cache)
    assert r.status == "ok", r
    assert "OPENED" not in r.stdout and secret not in r.stdout, r.stdout
    assert r.stdout.count("denied") == len(targets)


@needs_ns
def test_the_view_holds_only_what_the_interpreter_needs():
    """Walks the sandbox's whole tree: every entry is a planned bind, a parent of one, or its own tmpfs/proc."""
    allowed = [dst for _, _, dst in fs_plan(sys.executable)]
    code = (
        "import os, json\n"
        f"allowed = {sorted(set(allowed))!r}\n"
        "stray = []\n"
        "def under(p):\n"
        "    return any(p == a or p.startswith(a.rstrip('/') + '/') for a in allowed)\n"
        "def parent_of(p):\n"
        "    return any(a.startswith(p.rstrip('/') + '/') for a in allowed)\n"
        "for top, dirs, files in os.walk('/'):\n"
        "    if top in ('/proc', '/tmp', '/dev/shm'):\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    keep = []\n"
        "    for d in dirs:\n"
        "        p = os.path.join(top, d)\n"
        "        if under(p) or p in ('/proc', '/tmp', '/dev/shm'):\n"
        "            continue\n"
        "        (keep if parent_of(p) else stray).append(d if parent_of(p) else p)\n"
        "    dirs[:] = keep\n"
        "    stray += [os.path.join(top, f) for f in files if not under(os.path.join(top, f))]\n"
        "print(json.dumps(stray))\n"
    )
    r = run_code(code, FAST)
    assert r.status == "ok", r
    assert json.loads(r.stdout) == [], r.stdout


@needs_ns
def test_host_unix_sockets_are_unreachable(tmp_path):
    listeners = []
    paths = [str(tmp_path / "host.sock"), f"/tmp/prmkern-{uuid.uuid4().hex[:8]}.sock"]
    abstract = "\0prmkern-" + uuid.uuid4().hex
    try:
        for p in paths + [abstract]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(p)
            s.listen(4)
            s.settimeout(0.2)
            listeners.append(s)
        os.chmod(paths[0], 0o777)
        with open("/proc/net/unix") as f:  # and every pathname socket the host has
            host_sockets = sorted({ln.split()[-1] for ln in list(f)[1:] if len(ln.split()) > 7
                                   and ln.split()[-1].startswith("/")})[:200]
        code = (
            "import socket\n"
            f"for p in {paths + [abstract] + host_sockets!r}:\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    s.settimeout(0.5)\n"
            "    try:\n"
            "        s.connect(p)\n"
            "        s.sendall(b'leak')\n"
            "        print('CONNECTED', repr(p))\n"
            "    except OSError:\n"
            "        pass\n"
            "print('done')\n"
        )
        r = run_code(code, FAST)
        for s in listeners:
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        for s in listeners:
            s.close()
        for p in paths:
            if os.path.exists(p):
                os.remove(p)
    assert (r.status, r.stdout) == ("ok", "done\n"), r


@needs_ns
def test_no_network_not_even_loopback_or_the_hosts_addresses():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    addrs = {"127.0.0.1"}
    try:
        addrs.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    code = (
        "import socket\n"
        "print(sorted(line.split(':')[0].strip() for line in list(open('/proc/net/dev'))[2:]))\n"
        f"for a in {sorted(addrs)!r}:\n"
        "    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
        "        s = socket.socket(socket.AF_INET, kind)\n"
        "        s.settimeout(0.5)\n"
        "        try:\n"
        f"            s.connect((a, {port}))\n"
        "            s.send(b'leak')\n"
        "            print('SENT', a, kind)\n"
        "        except OSError:\n"
        "            pass\n"
    )
    try:
        r = run_code(code, FAST)
        with pytest.raises(socket.timeout):
            listener.accept()[0].close()
    finally:
        listener.close()
    assert r.status == "ok" and r.stdout == "['lo']\n", r


@pytest.mark.parametrize("mode", ["auto", "userns", "none"])
def test_socket_families_outside_the_network_namespace_io_uring_and_kernel_extras_are_refused(mode):
    """AF_VSOCK reaches a virtual machine's host whatever the network namespace; netlink, packet and the rest
    are not needed. Only creating sockets is tried (nothing is connected to)."""
    if mode != "auto":
        _mode_or_skip(mode)
    code = (
        "import ctypes, socket\n"
        "for fam, kind in (('AF_VSOCK', 1), ('AF_NETLINK', 2), ('AF_PACKET', 2), ('AF_ALG', 5), ('AF_TIPC', 2),\n"
        "                  ('AF_BLUETOOTH', 1), ('AF_CAN', 3), ('AF_RDS', 5)):\n"
        "    if not hasattr(socket, fam):\n"
        "        continue\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"  # below Python's audit hook (mode none has one)
        "    fd = libc.socket(getattr(socket, fam), kind, 0)\n"
        "    print(fam, 'CREATED' if fd >= 0 else 'refused')\n"
        "print('io_uring', 'SET UP' if libc.syscall(425, 8, None) >= 0 else 'refused')\n"
        "import platform\n"
        "nrs = {'x86_64': (321, 298, 323, 250), 'aarch64': (280, 241, 282, 219)}.get(platform.machine(), ())\n"
        "for nr in nrs:\n"  # bpf, perf_event_open, userfaultfd, keyctl with harmless (invalid) arguments
        "    ctypes.set_errno(0)\n"
        "    libc.syscall(nr, 0xFFFF, 0, 0, 0)\n"
        "    print(nr, 'EPERM' if ctypes.get_errno() == 1 else 'ALLOWED')\n"
    )
    r = run_code(code, FAST, isolation=mode)
    assert r.status == "ok" and "CREATED" not in r.stdout and "SET UP" not in r.stdout, r
    assert "ALLOWED" not in r.stdout, r
    assert "AF_VSOCK refused" in r.stdout and "io_uring refused" in r.stdout


@needs_ns
def test_writes_outside_the_private_tmp_do_not_land(tmp_path):
    name = "prmkern-escape-" + uuid.uuid4().hex
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)][0]
    site_mtime = os.stat(site).st_mtime_ns
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", f"/root/{name}", f"{REPO}/{name}",
               f"{site}/{name}.pth", f"/usr/lib/{name}", f"/etc/{name}", f"/{name}", str(tmp_path / name)]
    code = (
        f"for t in {targets!r}:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('escaped')\n"
        "    except OSError as e:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('fine')\n"
        "import os\nprint(os.getcwd(), open('inside.txt').read())\n"
    )
    r = run_code(code, FAST)
    assert (r.status, r.stdout) == ("ok", "/tmp fine\n"), r
    for t in targets:
        assert not os.path.exists(t), f"sandboxed code created {t} on the host"
    assert os.stat(site).st_mtime_ns == site_mtime


# -- output and memory ------------------------------------------------------------------------------------------

def test_huge_output_and_memory_hogs_fail_alone_and_the_next_snippet_is_clean():
    with SessionPool(FAST, max_workers=3) as pool:
        rs = pool.run_many([
            ("out", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stderr.write('y' * 65536)"),
            ("mem", "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))"),
            ("ok", "print(sum(range(10)))"),
        ])
        assert [r.status for r in rs] == ["output_limit", "memory_limit", "ok"], rs
        assert len(rs[0].stdout) + len(rs[0].stderr) == FAST.max_output_bytes and rs[0].state_lost
        assert rs[2].stdout == "45\n"
        nxt = pool.run_many([("out", "print('a')"), ("mem", "print('b')"), ("ok", "print('c')")])
        assert [(r.status, r.stdout, r.stderr) for r in nxt] == [("ok", f"{c}\n", "") for c in "abc"]
