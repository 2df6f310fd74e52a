#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs carried to the lent GPU machine, downloaded here into .whl/
# (git-ignored; about 8 MB, well inside a device call's 64 MiB). That machine (Python 3.12, its own
# torch, transformers, onnx, onnxruntime, pillow, pytest, hypothesis, psutil, pyarrow, matplotlib...)
# lacks only these of the project's imports; versions follow this checkout's venv where it has them.
#   open_clip_torch  the CLIP towers (clipcap.model)
#   ftfy, wcwidth    open_clip's text cleaning, imported with it
#   pillow-heif      HEIC/HEIF/AVIF decoding (clipcap.images)
# Carry `.whl` in the device call; gpu_check.sh installs them with --no-deps into a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
version() { "$PYTHON" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
specs=()
for name in open_clip_torch ftfy wcwidth pillow-heif; do
  v=$(version "$name"); specs+=("$name${v:+==$v}")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
ls -l .whl
