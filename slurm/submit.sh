#!/usr/bin/env bash
# Submit slurm/train.sbatch from any directory: records this repository and its Python in the job's
# environment (DIST_LORA_REPO, DIST_LORA_PYTHON), then passes everything else to sbatch.
#
#   bash /path/to/dist_lora/slurm/submit.sh [sbatch options] CONFIG.toml [section.key=value ...]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${DIST_LORA_PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "dist_lora: error: no Python at '$PYTHON'; run 'bash scripts/setup.sh' in '$REPO' first, or set" \
    "DIST_LORA_PYTHON." >&2
  exit 2
fi
OPTIONS=()
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do OPTIONS+=("$1"); shift; done
exec env DIST_LORA_REPO="$REPO" DIST_LORA_PYTHON="$PYTHON" sbatch "${OPTIONS[@]}" "$REPO/slurm/train.sbatch" "$@"
