"""The degraded isolation modes report exactly what they leave open (checked against what the code can do),
an engine without root falls back and says so, and a virtual environment is recognised by its own paths."""
import json
import os
import subprocess
import sys
import uuid

import pytest

from prmkern.sandbox import (
    NOT_ISOLATED,
    SandboxLimits,
    interpreter_paths,
    is_venv,
    probe_isolation,
    run_code,
)
from prmkern.sandbox.config import ROOT_CODE_GAP

FAST = SandboxLimits(wall_time_s=10.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=64 << 10)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"


def _probe_or_skip(mode: str):
    try:
        return probe_isolation(mode)
    except RuntimeError as e:
        pytest.skip(f"isolation {mode!r} does not work here: {e}")


def _world_readable_secret(tmp_path) -> tuple[str, str]:
    secret = "prmkern-secret-" + uuid.uuid4().hex
    path = tmp_path / "world.txt"
    path.write_text(secret)
    os.chmod(path, 0o644)
    for d in (tmp_path, *tmp_path.parents):
        if str(d) in ("/", "/tmp"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o005)
    return str(path), secret


@pytest.mark.parametrize("mode", ["root", "userns", "none"])
def test_each_mode_reports_what_it_leaves_open_and_that_report_is_true(mode, tmp_path):
    if mode == "root" and os.geteuid() != 0:
        pytest.skip("root mode needs root")
    info = _probe_or_skip(mode)
    expected = NOT_ISOLATED[mode]
    if mode == "none" and os.geteuid() == 0 and ROOT_CODE_GAP in info.not_isolated:
        expected = (ROOT_CODE_GAP, *expected)
    assert info.not_isolated == expected
    path, secret = _world_readable_secret(tmp_path)
    code = (
        "import os, socket\n"
        f"try:\n    print(open({path!r}).read())\nexcept OSError:\n    print('no file')\n"
        "try:\n    socket.socket().connect(('127.0.0.1', 9))\n"
        "except OSError as e:\n    print('net', type(e).__name__)\n"
        f"print(os.path.exists('/proc/{os.getpid()}/status'))\n"
    )
    r = run_code(code, FAST, isolation=mode)
    assert r.status == "ok" and r.not_isolated == info.not_isolated, r
    lines = r.stdout.splitlines()
    fs_open = any(g.startswith("filesystem") for g in info.not_isolated)
    assert (lines[0] == secret) == fs_open, (mode, lines)  # world-readable host files: readable iff reported
    procs_open = any(g.startswith("processes") for g in info.not_isolated)
    assert (lines[2] == "True") == procs_open, (mode, lines)  # the engine's process: visible iff reported


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root (to drop to an unprivileged uid) and a system python readable by it")
def test_an_engine_without_root_falls_back_and_reports_it(tmp_path):
    """The engine drops to uid 65534 after importing prmkern, then uses the sandbox with a system Python."""
    path, secret = _world_readable_secret(tmp_path)
    script = (
        "import json, os, sys\n"
        "import prmkern.sandbox as sb\n"
        "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        f"info = sb.probe_isolation('auto', python={SYSTEM_PYTHON!r})\n"
        f"snippet = {'import os; print(open(%r).read() if os.path.exists(%r) else %r)' % (path, path, 'hidden')!r}\n"
        f"r = sb.run_code(snippet, python={SYSTEM_PYTHON!r})\n"
        "print(json.dumps({'mode': info.mode, 'notes': info.notes, 'gaps': info.not_isolated, "
        "'status': r.status, 'out': r.stdout, 'err': r.stderr, 'r_gaps': r.not_isolated}))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd="/tmp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["mode"] in ("userns", "none") and "root: not running as root" in got["notes"]
    gaps = NOT_ISOLATED[got["mode"]]  # then what this host's resource control leaves open (no cgroup as nobody)
    assert tuple(got["gaps"][:len(gaps)]) == gaps and tuple(got["gaps"]) == tuple(got["r_gaps"])
    assert any(g.startswith("session memory: no usable memory cgroup") for g in got["gaps"][len(gaps):])
    assert got["status"] == "ok", got
    assert got["out"].strip() == (secret if got["mode"] == "none" else "hidden"), got


@pytest.fixture(scope="module")
def other_venv(tmp_path_factory):
    """A second venv made from the engine's base Python, its interpreter a symlink to the same binary."""
    base = os.path.join(sys.base_prefix, "bin", "python3")
    d = tmp_path_factory.mktemp("venv") / "other"
    subprocess.run([base, "-m", "venv", "--without-pip", "--symlinks", str(d)], check=True, timeout=120)
    return d


def test_venv_detection_asks_the_interpreter_not_its_symlink(other_venv):
    py = str(other_venv / "bin" / "python")
    # The symlink leads to the very binary the engine's venv uses: a realpath guess would take it for ours.
    assert os.path.realpath(py) == os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
    paths = interpreter_paths(py)
    assert os.path.realpath(paths["prefix"]) == os.path.realpath(other_venv)
    assert os.path.realpath(paths["prefix"]) != os.path.realpath(sys.prefix)
    assert is_venv(py) and is_venv(sys.executable) == (sys.prefix != sys.base_prefix)
    engine_site = [p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages")]
    assert not set(engine_site) & set(paths["path"])  # not the engine's site-packages


def test_snippets_run_in_the_venv_they_are_given(other_venv):
    py = str(other_venv / "bin" / "python")
    engine_site = [p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages")][0]
    code = ("import sys, os\nprint(sys.prefix)\n"
            f"print(os.path.isdir({engine_site!r}))\n"
            "try:\n    import pytest\n    print('pytest')\nexcept ImportError:\n    print('no pytest')\n")
    r = run_code(code, FAST, python=py)
    assert r.status == "ok", r
    prefix, engine_visible, pytest_line = r.stdout.splitlines()
    assert os.path.realpath(prefix) == os.path.realpath(other_venv)
    assert pytest_line == "no pytest"  # pytest lives in the engine's venv only
    if r.isolation != "none":
        assert engine_visible == "False"  # the engine's venv is not even in the view


def test_a_project_root_put_on_sys_path_by_a_pth_file_stays_out_of_the_view(tmp_path):
    """Editable installs may add a project root to sys.path; the project's files must not become readable."""
    if probe_isolation().mode == "none":
        pytest.skip("no filesystem view in isolation 'none'")
    project = tmp_path / "project"
    project.mkdir()
    secret = "prmkern-secret-" + uuid.uuid4().hex
    (project / "secretmod.py").write_text(f"SECRET = {secret!r}\n")
    venv = tmp_path / "venv"
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", "--without-pip", "--symlinks",
                    str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "_project.pth").write_text(str(project) + "\n")
    py = str(venv / "bin" / "python")
    assert str(project) in interpreter_paths(py)["path"]  # the interpreter itself would import from there
    code = (f"import os\nprint(os.path.exists({str(project)!r}))\n"
            "try:\n    import secretmod\n    print(secretmod.SECRET)\nexcept ImportError:\n    print('hidden')\n")
    r = run_code(code, FAST, python=py)
    assert (r.status, r.stdout) == ("ok", "False\nhidden\n"), r
