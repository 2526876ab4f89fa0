#!/usr/bin/env bash
# Creates .venv and installs dist_lora with its dependencies. Idempotent: when pyproject.toml and the
# repository's place have not changed since the last set-up, it checks the environment and returns.
# TORCH_SPEC picks the PyTorch build (default: the CPU build this project's CI uses). On a CUDA
# workstation, install your CUDA torch into .venv first or set e.g. TORCH_SPEC="torch==2.9.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.dist_lora_setup
WANT="$(sha256sum pyproject.toml | cut -c1-64) $(pwd -P)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import dist_lora, torch" 2>/dev/null; then
  echo "dist_lora environment ready (unchanged since its set-up)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, diffusers, accelerate, peft, webdataset, deepspeed, bitsandbytes; print('dist_lora environment ready: torch', torch.__version__)" 2>&1 | tail -1
echo "$WANT" > "$STAMP"
