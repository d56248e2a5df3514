#!/usr/bin/env bash
# The test suite against the newest releases of every dependency (within pyproject.toml's ranges; torch stays the
# CPU 2.13.0 build), in a venv of its own (.venv-newest, made anew each run), so that an upstream release that
# breaks prmkern shows up here before it reaches the README's commands. Prints the packages whose versions differ
# from the lock (constraints/cpu-py<X.Y>.txt), then pytest's failures. Exit code: pytest's.
# When it passes, scripts/update_constraints.sh .venv-newest writes the new lock. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
rm -rf "$venv"
PRMKERN_VENV="$venv" PRMKERN_UNLOCKED=1 bash scripts/setup_env.sh dev || { echo "test_newest: install failed"; exit 2; }
pyver="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
lock="constraints/cpu-py$pyver.txt"
echo "== versions that differ from $lock (locked -> newest):"
"$venv/bin/python" - "$lock" <<'PY'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {}
for line in open(sys.argv[1]) if __import__("os").path.exists(sys.argv[1]) else []:
    line = line.split("#")[0].strip()
    if "==" in line:
        name, ver = line.split("==", 1)
        locked[norm(name)] = ver
now = {norm(d.metadata["Name"]): d.version for d in distributions() if norm(d.metadata["Name"]) != "prmkern"}
same = lambda a, b: a == b or (a is not None and b is not None and b.split("+")[0] == a)  # 2.13.0 == 2.13.0+cpu
changed = [(n, locked.get(n, "-"), now.get(n, "-")) for n in sorted(set(locked) | set(now))
           if not same(locked.get(n), now.get(n)) and n not in ("pip",)]
for n, a, b in changed:
    print(f"  {n}: {a} -> {b}")
print(f"  ({len(changed)} differ)" if changed else "  (none)")
PY
echo "== pytest on the newest releases"
TRITON_INTERPRET="${TRITON_INTERPRET:-1}" "$venv/bin/python" -m pytest -q -rfE "$@" 2>&1 | tee "$venv/pytest.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "== what broke (failures and errors above; full log: $venv/pytest.log)"
  grep -E "^(FAILED|ERROR) " "$venv/pytest.log" | sed 's/^/  /'
else
  echo "== all green: scripts/update_constraints.sh $venv writes the new lock"
fi
exit "$rc"
