"""The sandbox's limits across a whole session (issue 24, items 1, 2 and 4): memory held in memfds, SysV shared
memory and tmpfs inodes beyond memory_bytes; CPU burners in one session making other sessions' snippets time
out; a forged "done" report accepted for a limit the snippet never reached. Each case runs with the memory cgroup
this host offers (skipped where there is none) and with the fallback (cgroups turned off), which must hold too.

Safe by construction: every snippet targets only the sandbox's own objects (its memfds, its private /dev/shm,
its own IPC namespace's SysV segments: the shm cases are skipped in isolation "none", where IPC is the host's,
unless the fallback's seccomp refuses shmget anyway); no host file is created.
"""
from __future__ import annotations

import pytest

from prmkern.sandbox import SandboxLimits, SandboxSession, SessionPool, cgroups, probe_isolation

MiB = 1 << 20
LIMITS = SandboxLimits(memory_bytes=256 * MiB, wall_time_s=20, cpu_time_s=15)

MEMFD_HOG = ("import os\nfds = []\nfor i in range(15):\n    fd = os.memfd_create('m%d' % i)\n    b = b'x' * (1 << 20)\n"
             "    for _ in range(64):\n        os.write(fd, b)\n    fds.append(fd)\nprint('held', len(fds))")
MEMFD_KEEP = ("import os\nfds = []\nfor i in range(3):\n    fd = os.memfd_create('k%d' % i)\n    b = b'x' * (1 << 20)\n"
              "    for _ in range(40):\n        os.write(fd, b)\n    fds.append(fd)\nprint('kept', len(fds))")
SHM_HOG = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
           "n = 0\nfor i in range(16):\n    sid = libc.shmget(0, 64 << 20, 0o1600)\n    if sid < 0:\n"
           "        print('refused', ctypes.get_errno())\n        break\n    a = libc.shmat(sid, None, 0)\n"
           "    ctypes.memset(a, 1, 64 << 20)\n    libc.shmdt(ctypes.c_void_p(a))\n    n += 1\nprint('segments', n)")
INODES = ("n = 0\ntry:\n    for i in range(200000):\n        open('/dev/shm/f%d' % i, 'w').close()\n        n += 1\n"
          "except OSError as e:\n    print('stopped', e.errno)\nprint('files', n)")


@pytest.fixture(params=["cgroup", "fallback"])
def support(request, monkeypatch):
    """The host's cgroups, or none (the fallback): sessions read cgroups.current_support() when they start."""
    real = cgroups.current_support()
    if request.param == "cgroup":
        if not real.memory:
            pytest.skip(f"no usable memory cgroup here: {real.notes}")
        return real
    off = cgroups.Support(0, {}, False, ("turned off by the test",))
    monkeypatch.setattr(cgroups, "_support", [off])
    return off


def _held(session: SandboxSession) -> int:
    """Bytes the session's cgroup holds now."""
    return session._proc.group.memory_bytes()[0]


def test_memfds_cannot_hold_more_than_memory_bytes(support):
    # Before: +960 MiB of memfds held by a 256 MiB session, idle between snippets.
    with SandboxSession(LIMITS) as s:
        r = s.run(MEMFD_HOG)
        assert "held 15" not in r.stdout, r
        if support.memory:
            assert r.status == "memory_limit" and r.state_lost and "memory cgroup" in r.error, r
            kept = s.run(MEMFD_KEEP)  # 120 MiB: under the bound, and kept while the session idles
            assert kept.status == "ok" and kept.stdout == "kept 3\n", kept
            assert s.run("x = 1").status == "ok"
            assert 120 * MiB <= _held(s) <= LIMITS.memory_bytes
        else:
            assert r.status == "error" and "PermissionError" in r.error, r  # memfd_create refused


def test_sysv_shared_memory_is_bounded(support):
    # Before: +1,000 MiB of SysV shm held by a 256 MiB session.
    if probe_isolation().mode == "none" and support.memory:
        pytest.skip("isolation 'none' shares the host's IPC namespace: no shm snippet is run against it")
    with SandboxSession(LIMITS) as s:
        r = s.run(SHM_HOG)
        assert r.status in ("ok", "memory_limit"), r
        segments = int(r.stdout.split("segments ")[-1]) if "segments" in r.stdout else 0
        assert segments * 64 * MiB <= LIMITS.max_file_bytes, r.stdout  # the namespace's shmall
        if not support.memory:
            assert "refused 1" in r.stdout and segments == 0, r.stdout  # EPERM from seccomp


def test_tmpfs_inodes_are_bounded(support):
    # Before: 200k empty files on the private tmpfs pinned +271 MiB of kernel memory.
    if probe_isolation().mode == "none":
        pytest.skip("isolation 'none' has no private tmpfs")
    with SandboxSession(LIMITS) as s:
        r = s.run(INODES)
        assert r.status == "ok" and "stopped 28" in r.stdout, r  # ENOSPC
        assert int(r.stdout.split("files ")[-1]) < LIMITS.max_tmpfs_files


GOOD = "import time\nt = time.process_time()\nx = 0\nwhile time.process_time() - t < 0.5:\n    x += 1\nprint('done')"
BURNER = ("import os\nfor i in range(14):\n    if os.fork() == 0:\n        while True:\n            pass\n"
          "while True:\n    pass")


def test_cpu_burners_do_not_time_out_other_sessions(support):
    # Before: a session with 14 CPU burners made three ~1 s snippets of other sessions return "timeout".
    limits = SandboxLimits(wall_time_s=3.0, cpu_time_s=3, max_processes=16)
    with SessionPool(limits, max_workers=4) as pool:
        rs = pool.run_many([("burn", BURNER), ("a", GOOD), ("b", GOOD), ("c", GOOD)])
    assert [r.status for r in rs[1:]] == ["ok"] * 3, [(r.status, r.error, r.wall_time_s) for r in rs]
    assert all(r.stdout == "done\n" and 0.4 <= r.cpu_time_s < 1.5 for r in rs[1:]), [r.cpu_time_s for r in rs]
    assert rs[0].status in ("cpu_limit", "timeout") and rs[0].state_lost, rs[0]


def test_a_sleeping_snippet_still_times_out_on_the_wall_clock(support):
    r = SandboxSession(SandboxLimits(wall_time_s=1.0)).run("import time\ntime.sleep(30)")
    assert r.status == "timeout" and r.wall_time_s < 6, r


FORGE = (
    "import sys, os, json, struct, signal\n"
    "f, found = sys._getframe(), None\n"
    "while f is not None:\n"
    "    loc = f.f_locals\n"
    "    if isinstance(loc.get('token'), bytes) and isinstance(loc.get('done_w'), int):\n"
    "        found = (loc['token'].decode(), loc['done_w'])\n"
    "    f = f.f_back\n"
    "assert found, 'the worker frame holding the token was not found'\n"
    "msg = json.dumps({'token': found[0], 'status': %r, 'exit_code': 86,\n"
    "                  'exc': ['exception', 'MemoryError', '']}).encode()\n"
    "os.write(found[1], struct.pack('<I', len(msg)) + msg)\n"
    "os.kill(os.getpid(), signal.SIGSTOP)\n")


@pytest.mark.parametrize("claim", ["memory_limit", "process_limit"])
def test_a_forged_limit_report_is_not_accepted(claim):
    # Before: the token read from the worker's frames made a forged memory_limit report acceptable.
    with SandboxSession(LIMITS) as s:
        r = s.run(FORGE % claim)
        assert "was not found" not in r.stderr, r.stderr  # the forgery itself worked as the red team's did
        assert r.status != claim, r
        assert r.status in ("error", "protocol_error") and claim in (r.error or ""), r


def test_memory_error_without_pressure_is_the_codes_error():
    r = SandboxSession(LIMITS).run("raise MemoryError('I say so')")
    assert r.status == "error" and "MemoryError" in r.error, r


def test_probe_reports_what_this_host_enforces():
    info = probe_isolation()
    real = cgroups.current_support()
    assert info.resource_control == (f"cgroup{real.version}" if real.memory else "rlimits")
    text = " ".join(info.limits)
    assert "timeouts: wall clock less the time" in text
    if real.memory:
        assert "session memory: one cgroup" in text and "CPU: each session its own" in text
    else:
        assert any(g.startswith("session memory: no usable memory cgroup") for g in info.not_isolated)
