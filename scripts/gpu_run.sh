#!/usr/bin/env bash
# The one command for a lent GPU machine (run there from the repository root, with .whl/ carried; see
# scripts/gpu_wheels.sh). Installs the carried wheels beside the machine's own packages, records the
# device, runs the GPU suite's default rows (the loop, memory, fp16 recovery, ZeRO and fp8/nf4-base rows)
# within SUITE_SECONDS, then the CUDA test tier (`pytest -m gpu`) within TEST_SECONDS. Everything it
# writes is under $OUT: env.txt, suite.json, suite.log, gpu_tests.log, gpu_tests.xml.
#   ROWS=a,b,e,f,g SUITE_SECONDS=360 TEST_SECONDS=150 bash scripts/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
OUT=${OUT:?set OUT to the folder whose files come back}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed" | tee "$OUT/env.txt"; exit 1; }
export PYTHONPATH=/tmp/site:$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, diffusers, bitsandbytes, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/env.txt"
SUITE_SECONDS=${SUITE_SECONDS:-360}
# The suite checks its limit before each case; the outer timeout is the backstop for a hung case.
timeout $((SUITE_SECONDS + 60)) python3 benchmarks/gpu_suite.py --size full --out "$OUT/suite.json" \
  --rows "${ROWS:-a,b,e,f,g}" --time-limit "$SUITE_SECONDS" 2>&1 | tee "$OUT/suite.log" | grep -v "^step=" | tail -30
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu --junitxml "$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest -m gpu exit $?"; tail -15 "$OUT/gpu_tests.log"
