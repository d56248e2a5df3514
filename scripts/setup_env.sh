#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch 2.13.0 installed first, so that no later requirement
# pulls a CUDA build, then installs prmkern in editable mode (with the dev extras when given "dev").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
# Building with --no-build-isolation needs setuptools in the venv (Python >= 3.12 venvs come without it).
if ! "$py" -c "import setuptools" 2>/dev/null; then
  "$py" -m pip install -q "setuptools>=64" wheel
fi
stamp=".venv/.prmkern-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ -n "$(find csrc -newer "$stamp" -print -quit 2>/dev/null)" ]; then
  # --no-build-isolation: the C++ extension (csrc/) builds against this venv's torch, not a freshly downloaded one
  "$py" -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
  # pip -q hides setup.py's own line when the optional C++ build fails: say it here
  "$py" -c "import prmkern._C" 2>/dev/null || echo "prmkern: the C++ CPU kernels (csrc/) did not build; the torch" \
    "path will be used (see why: $py -m pip install --no-build-isolation -e .)" >&2
  touch "$stamp"
fi
