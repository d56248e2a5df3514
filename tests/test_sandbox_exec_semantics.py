"""Code output as GenPRM's released executor produced it: SessionPool.run_many + genprm_protocol.code_output_text
against the CodeExecutor semantics restated here (not copied) from RyanLiu112/GenPRM 590bc94,
src/prm_evaluation/infer_module/genprm_inference.py L18-64:

* one dict per solution, starting empty, given to `exec(code_block, namespace)` (so `__name__` is "builtins" and
  a SyntaxError names "<string>");
* stdout captured with `contextlib.redirect_stdout(io.StringIO())`, the result `.getvalue().strip()`;
* `signal.alarm(5)` whose handler raises TimeoutError("Code execution timed out"): "Code execute time out: {te}";
* any other Exception: "Code execute Error: {type(e).__name__}: {e}", what was printed before it dropped.

The reference below runs the restatement in this test process on our own fixed snippets (its alarm shortened to
1 s, as the sandbox's interrupt_s here); the sandbox runs them in its own processes.
"""
from __future__ import annotations

import contextlib
import io
import signal

import pytest

from prmkern.sandbox import SandboxLimits, SessionPool
from prmkern.verify.genprm_protocol import code_output_text

ALARM_S = 1
LIMITS = SandboxLimits(wall_time_s=4.0, cpu_time_s=4, interrupt_s=ALARM_S, memory_bytes=512 << 20,
                       max_output_bytes=64 << 10)


def released_execute(namespace: dict, code: str) -> str:
    def on_alarm(signum, frame):
        raise TimeoutError("Code execution timed out")
    try:
        f = io.StringIO()
        with contextlib.redirect_stdout(f):
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(ALARM_S)
            try:
                exec(code, namespace)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
        return f.getvalue().strip()
    except TimeoutError as te:
        return f"Code execute time out: {te}"
    except Exception as e:  # noqa: BLE001 - the release's own catch
        return f"Code execute Error: {type(e).__name__}: {e}"


SNIPPETS = [
    ("definitions", "x = 41\ndef f(a):\n    return a + 1"),
    ("use definitions", "print(f(x))"),
    ("__name__", "print(__name__)"),
    ("main guard", "if __name__ == '__main__':\n    print('main block')\nprint('after')"),
    ("class module", "class A:\n    pass\nprint(A.__module__)"),
    ("timeout", "import time\ny = 1\ntime.sleep(30)\ny = 2"),
    ("reuse after timeout", "print(x, y)"),
    ("syntax error", "print('a'"),
    ("syntax error line 2", "a = 1\nb = = 2"),
    ("multi-line exception", "raise ValueError('first line\\nsecond line')"),
    ("printed then raised", "print('before')\n1 / 0"),
    ("stderr", "import sys\nprint('to stderr', file=sys.stderr)\nprint('to stdout')"),
    ("fd 1", "import os\nos.write(1, b'raw fd one\\n')\nprint('printed')"),
    ("__stdout__", "import sys\nsys.__stdout__.write('dunder\\n')\nsys.stdout.write('w')\n"
                   "print(sys.__stdout__ is sys.stdout)"),
    ("subprocess", "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(3)'])\nprint('parent')"),
    ("stripped", "print('  padded  ')\nprint()"),
    ("key error", "def g():\n    raise KeyError('k')\ng()"),
    ("own timeout error", "raise TimeoutError('mine')"),
    ("state after errors", "print(sorted(k for k in globals() if not k.startswith('__')))"),
]


def test_snippets_read_as_the_released_executor_wrote_them(capfd):
    ns: dict = {}
    expected = [released_execute(ns, code) for _, code in SNIPPETS]
    capfd.readouterr()  # what the reference's fd-1 write printed here
    assert expected[2] == "builtins" and expected[6] == "41 1" and "<string>, line 1" in expected[7]
    with SessionPool(LIMITS, max_workers=2) as pool:
        got = []
        for name, code in SNIPPETS:
            (r,) = pool.run_many([("solution", code)])
            got.append(code_output_text(r))
            if name == "timeout":
                assert r.status == "timeout" and not r.state_lost, r  # interrupted in-process, state kept
    for (name, _), g, e in zip(SNIPPETS, got, expected):
        assert g == e, name


def test_fd_one_writes_are_not_code_output_but_reach_stderr():
    """The release's fd 1 was its console: os.write(1, ...) never reached the code output. Here it goes to the
    result's stderr, so it is kept for whoever reads the SandboxResult but not pasted into the chain."""
    with SessionPool(LIMITS) as pool:
        (r,) = pool.run_many([("s", "import os\nos.write(1, b'raw\\n')\nprint('printed')")])
    assert (r.stdout, r.stderr, code_output_text(r)) == ("printed\n", "raw\n", "printed")


def test_sessions_of_different_keys_do_not_share_a_namespace():
    with SessionPool(LIMITS, max_workers=2) as pool:
        pool.run_many([("a", "v = 'a'"), ("b", "v = 'b'")])
        ra, rb, rc = pool.run_many([("a", "print(v)"), ("b", "print(v)"), ("c", "print(v)")])
        assert [code_output_text(r) for r in (ra, rb, rc)] == \
            ["a", "b", "Code execute Error: NameError: name 'v' is not defined"]


def test_a_snippet_that_ignores_the_interruption_is_killed_and_loses_the_state():
    code = "import time\nwhile True:\n    try:\n        time.sleep(30)\n    except BaseException:\n        pass"
    with SessionPool(SandboxLimits(wall_time_s=2.0, cpu_time_s=2, interrupt_s=0.5)) as pool:
        pool.run_many([("s", "kept = 1")])
        (r,) = pool.run_many([("s", code)])
        assert r.status == "timeout" and r.state_lost and r.exception is None, r
        assert code_output_text(r) == "Code execute time out: Code execution timed out"
        (after,) = pool.run_many([("s", "print(kept)")])
        assert after.fresh_state and code_output_text(after) == \
            "Code execute Error: NameError: name 'kept' is not defined"


@pytest.mark.parametrize("value,ok", [(None, True), (0.5, True), (0, False), (-1, False), (True, False)])
def test_interrupt_s_is_validated(value, ok):
    if ok:
        lim = SandboxLimits(wall_time_s=10, interrupt_s=value)
        assert lim.interrupt_after_s == (5.0 if value is None else value)  # the release's alarm(5)
        assert SandboxLimits(wall_time_s=3).interrupt_after_s == pytest.approx(2.7)  # before the kill
    else:
        with pytest.raises(ValueError, match="interrupt_s must be None or a positive number"):
            SandboxLimits(interrupt_s=value)
