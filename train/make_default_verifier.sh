#!/usr/bin/env bash
# Reproduces prmkern/data/verifier/: synthetic data, tokenizer, generative SFT from scratch, the discriminative
# baseline (for the comparison only; it is not shipped), and the held-out evaluation. CPU only, one thread by
# default (on a shared machine two OpenMP threads stall whenever another process holds a core).
#   bash train/make_default_verifier.sh            # WORK=/tmp/prmkern-verifier by default
# Knobs (environment): WORK, PY, STEPS / STEPS2 / STEPS3 (the three generative SFT phases), DISC_STEPS, THREADS,
# N_TRAIN, EVAL_N, EVAL_K. About 75 min of one shared CPU thread for the three phases, 11 for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-/tmp/prmkern-verifier}
STEPS=${STEPS:-2500}
STEPS2=${STEPS2:-2000}
STEPS3=${STEPS3:-1200}
DISC_STEPS=${DISC_STEPS:-1500}
THREADS=${THREADS:-1}
N_TRAIN=${N_TRAIN:-40000}
mkdir -p "$WORK"

# 1. data: train (seed 1), eval-loss set (seed 2); the F1 held-out set below uses seed 12345 and --exclude
$PY train/synthetic.py --n "$N_TRAIN" --seed 1 --out "$WORK/train.jsonl"
$PY train/synthetic.py --n 200 --seed 2 --out "$WORK/eval.jsonl"
# phase-2 data: 70% of solutions carry a planted error (the only steps whose chains need real arithmetic)
$PY train/synthetic.py --n 30000 --seed 3 --p-error 0.7 --out "$WORK/train2.jsonl"
# phase-3 data: fresh records at the held-out mix (half the solutions wrong)
$PY train/synthetic.py --n 20000 --seed 4 --out "$WORK/train3.jsonl"
# 2. tokenizer on (a slice of) the training corpus
$PY train/tokenizer.py --out "$WORK/tok" --n 4000 --seed 1 --vocab-size 1024
# 3. the generative verifier: Qwen2, hidden 192, 4 layers, from scratch
$PY train/sft.py --train "$WORK/train.jsonl" --eval "$WORK/eval.jsonl" --tokenizer "$WORK/tok" --out "$WORK/gen" \
    --hidden 192 --layers 4 --heads 6 --kv-heads 2 --intermediate 512 --max-steps "$STEPS" --batch-size 16 \
    --lr 3e-3 --warmup 30 --eval-every 250 --save-every 250 --log-every 25 --threads "$THREADS"
# 3b. phase 2: continue from phase 1 (fresh optimiser, warm-up to 2e-3 then cosine) on the error-rich data
$PY train/sft.py --train "$WORK/train2.jsonl" --eval "$WORK/eval.jsonl" --init "$WORK/gen" --out "$WORK/gen2" \
    --max-steps "$STEPS2" --batch-size 16 --lr 2e-3 --warmup 50 --eval-every 250 --save-every 250 --log-every 25 \
    --threads "$THREADS"
# 3c. phase 3: continue at a lower peak rate on the evaluation mix
$PY train/sft.py --train "$WORK/train3.jsonl" --eval "$WORK/eval.jsonl" --init "$WORK/gen2" --out "$WORK/gen3" \
    --max-steps "$STEPS3" --batch-size 16 --lr 1.5e-3 --warmup 50 --eval-every 300 --save-every 300 --log-every 25 \
    --threads "$THREADS"
# 4. ship it: the Hugging Face files only (train_state.pt stays in $WORK)
rm -rf prmkern/data/verifier && mkdir -p prmkern/data/verifier
cp "$WORK"/gen3/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
    prmkern/data/verifier/
# bundled examples for the main command and tests: held-out records (seed 12345, none of them in train.jsonl)
$PY -c "import json, sys; sys.path.insert(0, 'train'); from evaluate import heldout
with open('prmkern/data/verifier/examples.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in heldout(32, 12345, ['$WORK/train.jsonl', '$WORK/train2.jsonl', '$WORK/train3.jsonl']))"
# 5. the discriminative baseline on the same labels (the three files' records), same backbone sizes
cat "$WORK/train.jsonl" "$WORK/train2.jsonl" "$WORK/train3.jsonl" > "$WORK/train_all.jsonl"
$PY train/discriminative.py --train "$WORK/train_all.jsonl" --tokenizer "$WORK/tok" --out "$WORK/disc" \
    --hidden 192 --layers 4 --heads 6 --kv-heads 2 --intermediate 512 --max-steps "$DISC_STEPS" --batch-size 16 \
    --lr 3e-3 --warmup 30 --threads "$THREADS"
# 6. held-out F1: generative K=1 and K=8, discriminative
$PY train/evaluate.py --model prmkern/data/verifier --disc "$WORK/disc" --n "${EVAL_N:-200}" --k "${EVAL_K:-8}" \
    --seed 12345 --exclude "$WORK/train.jsonl" "$WORK/train2.jsonl" "$WORK/train3.jsonl" --threads "$THREADS" | tee "$WORK/eval.txt"
