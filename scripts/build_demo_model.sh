#!/usr/bin/env bash
# Rebuild the embedded demo model, models/shapes-demo, from nothing (no downloads):
#   1. a tiny CLIP (ViT, fixed 2-D sin-cos positions) trained contrastively on shapes, with hard negatives
#      (training/pretrain_clip.py)
#   2. shapes data: 20,000 training images (seed 0), 2,000 held-out (seed 2026)  (training/shapes.py)
#   3. CLIP features of the training images                               (training/extract_features.py)
#   4. ClipCap: MLP mapper (prefix 4) + 3-layer GPT-2 + BPE, CLIP tower fine-tuned  (train.py --train-clip)
#   5. evaluation on the held-out images                                  (training/evaluate.py)
#   6. the bundle (clipcap.json, model.safetensors, tokenizer.json) copied to models/shapes-demo
# Each stage leaves a stamp in $WORK; a re-run skips finished stages. `rm -rf build/demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-build/demo}
THREADS=${THREADS:-2}
DEST=${DEST:-models/shapes-demo}
mkdir -p "$WORK"

stage() {  # stage NAME COMMAND...: run unless stamped, report its time
  local name=$1; shift
  if [ -f "$WORK/.done-$name" ]; then echo "== $name: done before, skipped (rm $WORK/.done-$name to redo)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  echo "$((SECONDS - start))" > "$WORK/.done-$name"
  echo "== $name: $((SECONDS - start)) s"
}

stage pretrain-clip "$PY" training/pretrain_clip.py --out "$WORK/clip" --steps 1200 --batch-size 64 --lr 5e-4 \
  --seed 0 --n-images 20000 --threads "$THREADS" --hard-negatives
stage data-train "$PY" training/shapes.py --out "$WORK/data/train" --n 20000 --seed 0
stage data-eval "$PY" training/shapes.py --out "$WORK/data/eval" --n 2000 --seed 2026
stage features "$PY" training/extract_features.py --data "$WORK/data/train/canonical.jsonl" \
  --clip-model training/configs/shapes-clip.json --clip-weights "$WORK/clip/clip_visual.safetensors" \
  --clip-preprocess "$WORK/clip/preprocess_cfg.json" --out "$WORK/features/train"
stage train "$PY" training/train.py --features "$WORK/features/train" --out "$WORK/run" \
  --train-clip --mapper mlp --prefix-length 4 \
  --gpt2 random --gpt2-layers 3 --gpt2-embd 128 --gpt2-heads 2 --gpt2-positions 64 --bpe-vocab-size 512 \
  --epochs "${EPOCHS:-6}" --batch-size 64 --lr 5e-4 --warmup-steps 300 --threads "$THREADS" --seed 0
stage evaluate "$PY" training/evaluate.py "$WORK/run" --data "$WORK/data/eval/captions.jsonl" --out "$WORK/eval"

mkdir -p "$DEST"
cp "$WORK/run/clipcap.json" "$WORK/run/model.safetensors" "$WORK/run/tokenizer.json" "$DEST/"
cp "$WORK/eval/scores.json" "$DEST/eval_scores.json"
total=0
for stamp in "$WORK"/.done-*; do total=$((total + $(cat "$stamp"))); done
echo "demo model written to $DEST; stage times add up to ${total} s (see $WORK/.done-*)"
