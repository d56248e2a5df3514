#!/usr/bin/env bash
# Writes constraints/cpu-py<X.Y>.txt (the lock the README's commands install) from a venv whose test run passed,
# by default .venv-newest from scripts/test_newest.sh. Review the diff (git diff constraints/) before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-newest}"
py="$venv/bin/python"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
out="constraints/cpu-py$pyver.txt"
{
  echo "# The exact versions the README's commands install on Python $pyver (scripts/setup_env.sh passes this file to pip -c)."
  echo "# Written by scripts/update_constraints.sh from $venv on $(date -u +%F), after its test run passed. Update it on"
  echo "# purpose: scripts/test_newest.sh first (newest releases in .venv-newest, says what broke), then this script."
  echo "# torch is the local CPU build: pip installs torch==2.13.0 first, so nothing resolves a CUDA build."
  echo "# prmkern's own ranges (pyproject.toml) stay open."
  "$py" -m pip list --format=freeze 2>/dev/null | grep -v -i -E '^(prmkern|pip)==' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > "$out"
echo "wrote $out ($(grep -c '==' "$out") pins)"
