#!/usr/bin/env bash
# Everything a GPU session should check and time, in one call of the `device` tool (about 10 minutes on an H200):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# 1. installs this checkout without dependencies (the GPU image has torch/triton/transformers, no registry);
# 2. runs the kernel tests on the GPU (bf16 included, which the CPU interpreter cannot check) and the CUDA-graph
#    test (captured decode == enforce_eager);
# 3. runs the kernel benchmarks (JSON + PNG) and the engine benchmark with CUDA graphs and with enforce_eager.
# Results land in $OUT (the device tool brings them back); commit them under benchmarks/results/ with the GPU name,
# commit and date they carry, and set TritonBackend's thresholds from the shared-prefix sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prmkern-gpu}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/session.log"; }

log "$(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/session.log"
pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { log "pip install failed"; tail "$OUT/pip.log"; }
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$OUT/session.log"

log "kernel tests (GPU, fp32/fp16/bf16) and CUDA graphs"
timeout 240 python -m pytest -q -x tests/kernels -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"

for b in paged_decode shared_prefix_decode paged_prefill elementwise; do
    log "bench_$b"
    timeout 150 python "benchmarks/bench_$b.py" --out "$OUT/$b.json" 2>&1 | tail -4 | tee "$OUT/bench_$b.txt"
done
# the PNGs the benches write next to their JSON
cp benchmarks/results/*.png "$OUT"/ 2>/dev/null || true

log "engine: ThinkPRM-like shapes are not available offline; the 39M Qwen2 of bench_engine, bf16, graphs vs eager"
for flag in "" "--enforce-eager"; do
    timeout 120 python benchmarks/bench_engine.py --dtype bfloat16 --prompt-len 2048 --chains 32 --gen-len 64 \
        --skip-transformers --pairs 3 $flag --out "$OUT/engine_bf16${flag:+_eager}.json" 2>&1 | tail -3
done
log "done"
