#!/usr/bin/env bash
# Set up (if needed) and run the end-to-end demo on a tiny SDXL pipeline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dist-lora demo "$@"
