#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite (unit + integration, multi-process on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check dist_lora tests benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
