"""benchmarks/gpu_session.sh fits a GPU window: every heavy command runs as a `step` with its own timeout, the
timeouts add up to <= 480 s (8 minutes; the machine's start is not in it), and the most valuable steps come first."""
from __future__ import annotations

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def _steps() -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^step (\S+) (\d+) ", SCRIPT.read_text(), re.M)]


def test_step_timeouts_fit_eight_minutes():
    steps = _steps()
    assert len(steps) >= 6, steps
    assert sum(t for _, t in steps) <= 480, steps


def test_every_command_is_a_timed_step_in_value_order():
    text = SCRIPT.read_text()
    for line in text.splitlines():  # python/pip/pytest only inside a step (comments, the step body aside)
        s = line.strip()
        if re.match(r"^(python|pip|pytest)\b", s):
            raise AssertionError(f"untimed command in gpu_session.sh: {s}")
    names = [n for n, _ in _steps()]
    assert names.index("correctness") < names.index("graphs") < names.index("bench_paged_decode") < names.index("bench_shared_prefix_decode")
    assert names.index("bench_shared_prefix_decode") < names.index("engine_graphs")
    assert "timeout" in text and "summary.tsv" in text
