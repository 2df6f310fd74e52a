#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine. Every step runs under its own time limit and
# writes under one results folder; a machine without CUDA skips each GPU step with its reason and the
# script still runs to the end (tests/test_gpu_check.py runs it so in CI).
#
#   bash scripts/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks -> .whl/
#   bash scripts/gpu_check.sh RESULTS [--pack] # there: carry .whl (the project travels as source)
#
# --pack leaves RESULTS/summary.json and RESULTS/gpu-check.tar.gz (everything else) and nothing more:
# the device tool brings back at most 8 files. Exit code: 0 when no step failed or ran out of time.
# Steps and limits (s): environment 30, wheels 60, gpu tests 150, full-size model 90, parity 120,
# latency 240, fp16 120: 13.5 minutes at worst (the fp16 step leaves less room for the machine's start
# inside a lent task's 15 minutes; drop it with SKIP_FP16=1).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-build/gpu-check}
PACK=${2:-}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
: > "$RESULTS/summary.jsonl"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The project runs from its source: nothing is installed on the GPU machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FULL_SIZE="$RESULTS/full-size"  # ViT-B-32 + GPT-2 small, random weights (model bundle only)
FP16="$RESULTS/fp16"  # the demo model's fp32 export, its fp16 sibling and held-out shapes (removed at the end)
failed=0

record() {  # name status seconds reason
  local reason=${4//\\/\\\\}
  reason=${reason//\"/\\\"}
  printf '{"step": "%s", "status": "%s", "seconds": %s, "reason": "%s"}\n' "$1" "$2" "$3" "$reason" \
    >> "$RESULTS/summary.jsonl"
  printf '%-12s %-8s %6ss  %s\n' "$1" "$2" "$3" "$4"
}

step() {  # name limit command... : output in RESULTS/name.log
  local name=$1 limit=$2 start rc status reason=""
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; reason="over its ${limit} s limit"; failed=1 ;;
    *) status=failed; reason="exit code $rc (see $name.log)"; failed=1 ;;
  esac
  record "$name" "$status" "$(( $(date +%s) - start ))" "$reason"
}

environment() {
  echo "commit: $(git describe --always --dirty 2>/dev/null || echo unknown)"
  echo "date: $(date -u +%FT%TZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i))
EOF
  "$PYTHON" -m pip list 2>/dev/null
}
export -f environment
export PYTHON
step environment 30 bash -c environment

no_cuda=$("$PYTHON" -c "import torch; print('' if torch.cuda.is_available() else 'torch sees no CUDA GPU here')" 2>&1 \
          || echo "torch does not import")
gpu_step() {  # like step, skipped with the reason when there is no CUDA GPU
  if [ -n "$no_cuda" ]; then record "$1" skipped 0 "$no_cuda"; else step "$@"; fi
}

# Wheels the GPU machine lacks (scripts/gpu_wheels.sh lists them), installed beside its own packages.
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/clipcap-gpu-site
  gpu_step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
else
  record wheels skipped 0 "no .whl folder: scripts/gpu_wheels.sh makes it (nothing to install)"
fi

mapfile -t gpu_tests < <(grep -rlE "pytest\.mark\.gpu" tests --include='*.py' | sort)
gpu_step gpu-tests 150 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$RESULTS/gpu-tests.xml" \
  "${gpu_tests[@]}"
gpu_step full-size 90 "$PYTHON" -c \
  "from clipcap_bench.bundles import make_full_size_bundles; make_full_size_bundles('$FULL_SIZE', exports=False)"
# fp32 greedy and beam tokens on CUDA against the CPU: the trained demo model and the full-size one.
gpu_step parity 120 "$PYTHON" benchmarks/device_parity.py models/shapes-demo "$FULL_SIZE/model" --device cuda \
  --max-tokens 20 --out "$RESULTS/parity.json"
# The targets' settings: ViT-B-32 + GPT-2 small, 20-token greedy, p50 at batch 1, captions/s at 8, 64, 256.
gpu_step latency 240 "$PYTHON" benchmarks/latency.py "$FULL_SIZE/model" --backends torch,torch-nocache \
  --device cuda --batch-sizes 1,8,64,256 --tokens 20 --warmup 2 --iters 10 --time-budget 20 --threads 4 \
  --out "$RESULTS/latency"
# The fp16 sibling on onnxruntime's CUDA provider (needs onnxruntime-gpu there): demo captions identical to
# the fp32 export's on the same GPU, CIDEr delta (fp16-agreement.json), then both timed side by side.
fp16_check() {
  "$PYTHON" export/to_onnx.py models/shapes-demo --out "$FP16/onnx" \
  && "$PYTHON" training/shapes.py --out "$FP16/heldout" --n 200 --seed 2026 \
  && "$PYTHON" export/quantize.py "$FP16/onnx" --method fp16 --encoder --device cuda \
       --data "$FP16/heldout/captions.jsonl" --limit 200 \
  && cp "$FP16/onnx-fp16/quantization.json" "$RESULTS/fp16-agreement.json" \
  && "$PYTHON" benchmarks/latency.py "$FP16/onnx" "$FP16/onnx-fp16" --backends onnxruntime,onnxruntime-fp16 \
       --device cuda --batch-sizes 1,8 --tokens 20 --warmup 2 --iters 10 --out "$RESULTS/fp16-latency"
}
export -f fp16_check
export FP16 RESULTS
if [ -n "${SKIP_FP16:-}" ]; then record fp16 skipped 0 "SKIP_FP16 set"; else gpu_step fp16 120 bash -c fp16_check; fi

"$PYTHON" - "$RESULTS" <<'EOF' || failed=1
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
steps = [json.loads(line) for line in (results / "summary.jsonl").read_text().splitlines()]
(results / "summary.json").write_text(json.dumps({"steps": steps}, indent=1) + "\n")
EOF
rm -f "$RESULTS/summary.jsonl"
rm -rf "$FULL_SIZE" "$FP16"  # ~600 MB of weights, rebuilt in seconds; the demo's graphs and images
if [ "$PACK" = "--pack" ]; then
  archive=$(mktemp)
  (cd "$RESULTS" && tar -czf "$archive" --exclude=./summary.json . && find . -mindepth 1 ! -name summary.json -delete \
   && mv "$archive" gpu-check.tar.gz) || failed=1
fi
exit $failed
