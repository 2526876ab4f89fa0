#!/usr/bin/env bash
# The one command for a lent GPU machine (run there from the repository root, with .whl/ carried; see
# scripts/gpu_wheels.sh). Installs the carried wheels beside the machine's own packages, records the
# device, then runs the GPU suite's rows (default: the loop, memory, fp16-recovery and ZeRO rows) within
# SUITE_SECONDS. Everything it writes is under $OUT: env.txt, suite.json, suite.log.
#   ROWS=a,b,e,f SUITE_SECONDS=420 bash scripts/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
OUT=${OUT:?set OUT to the folder whose files come back}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed" | tee "$OUT/env.txt"; exit 1; }
export PYTHONPATH=/tmp/site:$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, diffusers, bitsandbytes, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/env.txt"
SECONDS_LEFT=${SUITE_SECONDS:-420}
timeout $((SECONDS_LEFT + 60)) python3 benchmarks/gpu_suite.py --size full --out "$OUT/suite.json" \
  --rows "${ROWS:-a,b,e,f}" --time-limit "$SECONDS_LEFT" 2>&1 | tee "$OUT/suite.log" | tail -30
