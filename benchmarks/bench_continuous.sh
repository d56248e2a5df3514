#!/bin/bash
# Continuous batching across records vs the batch-synchronous code, side by side on one machine: the same
# `prmkern verify` command run alternately from BASE (a checkout of the commit before the change, with the C++
# extension copied in) and from this checkout, REPS times each; prints each run's summary figures.
# Usage: BASE=/path/to/old/checkout bash benchmarks/bench_continuous.sh [REPS] [extra verify flags]
set -u
BASE=${BASE:?set BASE to a checkout of the code to compare against}
NEW=$(cd "$(dirname "$0")/.." && pwd)
REPS=${1:-2}; shift || true
OUT=${OUT:-/tmp/bench_continuous}; mkdir -p "$OUT"
PY=${PY:-python}
for rep in $(seq 1 "$REPS"); do
  for side in base new; do
    ROOT=$([ $side = base ] && echo "$BASE" || echo "$NEW")
    (cd "$ROOT" && PYTHONPATH=$ROOT OMP_NUM_THREADS=1 $PY -m prmkern.cli verify --device cpu --threads 1 --chains 8 \
      --no-progress --no-chains -o "$OUT/$side$rep.jsonl" --summary "$OUT/$side$rep.json" "$@" > "$OUT/$side$rep.log" 2>&1)
    $PY -c "import json,sys; d=json.load(open(sys.argv[1])); e=d['engine']; print(sys.argv[2], d['seconds'], 's',
d['chains_per_s'], 'chains/s', d['generated_tokens_per_s'], 'tok/s', e['generated_tokens'], 'tokens', e['decode_steps'],
'decode steps')" "$OUT/$side$rep.json" "$side$rep"
  done
done
