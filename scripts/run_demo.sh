#!/usr/bin/env bash
# The main job on the embedded default model, on the CPU: sets up .venv, then runs `prmkern demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/prmkern demo --device cpu "$@"
