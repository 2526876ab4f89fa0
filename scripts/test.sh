#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite (unit + integration, multi-process on CPU).
# Tests run in DIST_LORA_TEST_WORKERS pytest-xdist workers (default 2; 0 runs them in this process):
# many tests spend their time starting processes or waiting on Slurm, so two at a time fill 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check dist_lora tests benchmarks
WORKERS=${DIST_LORA_TEST_WORKERS:-2}
PARALLEL=()
if [ "$WORKERS" != 0 ]; then
  PARALLEL=(-n "$WORKERS" --dist loadgroup)
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "$@"
