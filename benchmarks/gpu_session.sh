#!/usr/bin/env bash
# One GPU session in one command, <= 8 minutes on a fresh H200 (torch 2.11, triton 3.6, transformers 5.17, no
# package registry), most valuable first:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
# Every step runs under its own timeout (`step NAME SECONDS CMD...`; tests/kernels/test_gpu_session.py checks they
# add up to <= 480 s) and writes its result file into $OUT as soon as it ends, so a session killed part-way still
# returns what finished; summary.tsv gets one line per step, and the summary is printed last.
#  1. install this checkout without dependencies;
#  2. GPU correctness: the kernel tests (bf16 and fp16 against float64 references; the fused cascade), then the
#     CUDA-graph tests (padding rows written from a poisoned pool; captured decode == enforce_eager);
#  3. paged_decode and the cascade at the goal shapes (vs SDPA and unshared paged_decode), with the traffic model;
#  4. short prefill and elementwise sweeps;  5. the engine, CUDA graphs vs eager.
# Commit the results under benchmarks/results/ with the GPU name, commit and date they carry; set TritonBackend's
# thresholds from the shared-prefix rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prmkern-gpu}
mkdir -p "$OUT"
START=$(date +%s)
printf 'step\trc\tseconds\tlimit_s\n' > "$OUT/summary.tsv"

step() {  # step NAME SECONDS CMD... : stdout+stderr to $OUT/NAME.log, one summary line as soon as it ends
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (<= ${limit}s) $(date -u +%T)"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/summary.tsv"
    tail -4 "$OUT/$name.log"
}

{ date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || echo "commit unknown";
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1; } > "$OUT/session.txt"
cat "$OUT/session.txt"

step install 40 pip install --no-deps --no-build-isolation -e .
step versions 10 python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
# -v: one line per test in the log as it ends (a killed step still tells what passed); files in value order
step correctness 110 python -m pytest -v -p no:cacheprovider --junitxml="$OUT/correctness.xml" \
    tests/kernels/test_cascade_decode.py tests/kernels/test_paged_decode.py tests/kernels/test_triton_backend.py \
    tests/kernels/test_paged_prefill.py tests/kernels/test_shared_prefix_decode.py tests/kernels/test_merge_states.py \
    tests/kernels/test_store_kv.py tests/kernels/test_rms_norm.py tests/kernels/test_rotary.py \
    tests/kernels/test_silu_and_mul.py tests/kernels/test_launcher_errors.py
step graphs 70 python -m pytest -v -p no:cacheprovider --junitxml="$OUT/graphs.xml" tests/kernels/test_cuda_graphs.py
step bench_paged_decode 45 python benchmarks/bench_paged_decode.py --quick --out "$OUT/paged_decode.json"
step bench_shared_prefix_decode 60 python benchmarks/bench_shared_prefix_decode.py --quick \
    --out "$OUT/shared_prefix_decode.json"
step bench_paged_prefill 30 python benchmarks/bench_paged_prefill.py --quick --out "$OUT/paged_prefill.json"
step bench_elementwise 25 python benchmarks/bench_elementwise.py --quick --out "$OUT/elementwise.json"
step engine_graphs 45 python benchmarks/bench_engine.py --dtype bfloat16 --prompt-len 2048 --chains 32 --gen-len 64 \
    --skip-transformers --pairs 2 --out "$OUT/engine_bf16.json"
step engine_eager 40 python benchmarks/bench_engine.py --dtype bfloat16 --prompt-len 2048 --chains 32 --gen-len 64 \
    --skip-transformers --pairs 2 --enforce-eager --out "$OUT/engine_bf16_eager.json"

echo "== summary ($(( $(date +%s) - START ))s)"
column -t "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
grep -h -E "FAILED|ERROR| passed| failed" "$OUT/correctness.log" "$OUT/graphs.log" | tail -12
