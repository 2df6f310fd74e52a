#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: Python venv with pinned torch, the project and its
# extras, and Java 17 for TorchServe. Re-running it only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.clipcap-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  # Pinned for this project's machines: both wheels sit on the local package mirror; an unpinned
  # torch downloads gigabytes, and a mismatched torchvision breaks transformers' GPT-2 import.
  case "$(uname -m)" in
    aarch64) "$VENV/bin/pip" install -q torch==2.9.1 torchvision==0.24.1 ;;
    *)       "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 ;;
  esac
  "$VENV/bin/pip" install -q -e ".[torch,export,train,serve,serve-ray,bench,ray,openvino,dev]"
  touch "$stamp"
fi

# TorchServe 0.12 runs on Java 11+; install OpenJDK 17 where no suitable java is found.
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 11 ]; then
  echo "setup: installing OpenJDK 17 for TorchServe" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'), java $(java_major))"
