#!/usr/bin/env bash
# The test suite on the CPU (Triton kernels under the interpreter): sets up .venv with dev extras, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec .venv/bin/python -m pytest -q "$@"
