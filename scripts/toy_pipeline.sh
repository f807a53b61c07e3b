#!/usr/bin/env bash
# The whole Vision-R1 recipe on the built-in toy task, on a CPU, in about 4 minutes (2 idle cores: 3 min 30 s
# and 3 min 50 s measured; longer on a machine busy with other jobs):
#   toy data + random base model -> cold-start SFT -> GRPO with PTST -> evaluation of each.
# Usage: bash scripts/toy_pipeline.sh [OUT_DIR]   (default runs/toy; PYTHON overrides the interpreter;
#        FAMILY=qwen3_vl|qwen3_5|idefics3 builds that model family instead of Qwen2.5-VL: README "Model families")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/toy}
export TOKENIZERS_PARALLELISM=false

FAMILY=${FAMILY:-qwen2_5_vl}

echo "== 1. toy task: images, RL/eval splits, cold-start data, and a random tiny model ($FAMILY) =="
[ -f "$OUT/base/config.json" ] || $PY -m minivr1.toy "$OUT" --model_size tiny --family "$FAMILY"

echo "== 2. evaluate the base model (random weights: no format, no accuracy) =="
$PY evaluate.py --config configs/toy_eval.yaml --model "$OUT/base" --data "$OUT/data/eval.jsonl" \
    --output_dir "$OUT/eval-base" --max_new_tokens 64

echo "== 3. cold-start SFT =="
$PY train_sft.py --config configs/toy_sft.yaml --model "$OUT/base" --data "$OUT/data/cold_start.json" \
    --output_dir "$OUT/sft"
$PY evaluate.py --config configs/toy_eval.yaml --model "$OUT/sft/final" --data "$OUT/data/eval.jsonl" \
    --output_dir "$OUT/eval-sft"

echo "== 4. GRPO with PTST from the SFT model =="
$PY train_grpo.py --config configs/toy_grpo_ptst.yaml --model "$OUT/sft/final" \
    --data "$OUT/data/rl_train.jsonl" --output_dir "$OUT/grpo"
$PY evaluate.py --config configs/toy_eval.yaml --model "$OUT/grpo/final" --data "$OUT/data/eval.jsonl" \
    --output_dir "$OUT/eval-grpo"

echo "== before / after on $(wc -l < "$OUT/data/eval.jsonl") held-out problems =="
$PY -m minivr1.evaluation "base=$OUT/eval-base" "cold-start SFT=$OUT/eval-sft" "SFT + GRPO (PTST)=$OUT/eval-grpo" \
    | tee "$OUT/results.md"
echo "training curves: $OUT/sft/training_curves.png $OUT/grpo/training_curves.png (redraw: $PY -m minivr1.plots DIR)"
