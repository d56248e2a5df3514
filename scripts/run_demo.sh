#!/usr/bin/env bash
# The main job on the CPU: sets up .venv, then verifies the bundled held-out examples with the shipped verifier
# (prmkern/data/verifier, K=8 chains per solution) and prints per-step scores, a summary and the agreement with
# the gold labels. Extra arguments go to `prmkern verify` (e.g. `processbench`, `--model DIR`, `--chains 4`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/prmkern verify --device cpu --no-chains "$@"
