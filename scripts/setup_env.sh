#!/usr/bin/env bash
# Creates the venv (.venv, or $PRMKERN_VENV) if missing and installs prmkern in editable mode (with the extras given
# as $1, e.g. "dev"), at the versions pinned in constraints/cpu-py<X.Y>.txt: the ones the test suite passed with.
# Order matters: the CPU build of torch 2.13.0 first, so that no later requirement resolves a CUDA build; then
# prmkern with --no-build-isolation, so that its C++ kernels (csrc/) build against this venv's torch.
# PRMKERN_UNLOCKED=1 ignores the lock and takes the newest releases within pyproject.toml's ranges
# (scripts/test_newest.sh does that, in its own venv).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${PRMKERN_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
lock="constraints/cpu-py$pyver.txt"
cons=()
if [ "${PRMKERN_UNLOCKED:-0}" = 1 ]; then
  echo "prmkern: PRMKERN_UNLOCKED=1: installing the newest releases within pyproject.toml's ranges" >&2
elif [ -f "$lock" ]; then
  cons=(-c "$lock")
else
  echo "prmkern: no version lock for Python $pyver (constraints/ has: $(ls constraints | grep '^cpu-py' | tr '\n' ' '))" \
    "- installing the newest releases, an untested combination" >&2
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
# Building with --no-build-isolation needs setuptools and wheel in the venv (Python >= 3.12 venvs come without them).
"$py" -m pip install -q "${cons[@]}" "setuptools>=64" wheel
stamp="$venv/.prmkern-installed"
if [ ! -f "$stamp" ] || [ -n "$(find setup.py pyproject.toml constraints csrc -newer "$stamp" -print -quit)" ]; then
  "$py" -m pip install -q "${cons[@]}" --no-build-isolation -e .
  # pip -q hides setup.py's own line when the optional C++ build fails: say it here
  "$py" -c "import prmkern._C" 2>/dev/null || echo "prmkern: the C++ CPU kernels (csrc/) did not build; the torch" \
    "path will be used (see why: $py -m pip install --no-build-isolation -e .)" >&2
  rm -f "$venv"/.prmkern-extra-*
  touch "$stamp"
fi
# The extras' requirements on their own: a second `pip install -e .[dev]` would rebuild the C++ kernels for nothing.
for extra in ${extras//,/ }; do
  if [ ! -f "$venv/.prmkern-extra-$extra" ]; then
    mapfile -t reqs < <("$py" - "$extra" <<'PY'
import re, sys
from importlib.metadata import requires
# the installed prmkern's metadata lists every extra's requirements as `NAME>=X; extra == "dev"`
reqs = [r.split(";")[0].strip() for r in requires("prmkern") or []
        if re.search(r"""extra\s*==\s*["']%s["']""" % re.escape(sys.argv[1]), r)]
if not reqs:
    sys.exit(f"setup_env.sh: prmkern has no extra {sys.argv[1]!r} (see [project.optional-dependencies])")
print("\n".join(reqs))
PY
)
    "$py" -m pip install -q "${cons[@]}" "${reqs[@]}"
    touch "$venv/.prmkern-extra-$extra"
  fi
done
