#!/usr/bin/env bash
# Train on a RunPod pod. Everything that must survive a pod stop lives on the volume at /workspace:
# the repository and its .venv, the model cache, the shards and the run directories.
#
#   bash launch/runpod.sh configs/sdxl.toml output.dir=/workspace/runs/my_style
#
# A stopped or preempted pod is resumed by running the same command again: the run continues from its
# latest checkpoint (set checkpoint.every_steps in the config). SSH sessions do not inherit the pod's
# environment variables, so the ones that matter are set here.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HOME=${HF_HOME:-/workspace/hf_cache}
export WANDB_DIR=${WANDB_DIR:-/workspace/wandb}
bash scripts/setup.sh  # .venv lives in the repository, on the volume: set up once, reused after a stop
GPUS=$(.venv/bin/python -c "import torch; print(max(1, torch.cuda.device_count()))")
CONFIG=${1:?usage: launch/runpod.sh CONFIG.toml [section.key=value ...]}
shift
if [ "$GPUS" -gt 1 ]; then
  exec .venv/bin/accelerate launch --config_file launch/multi_gpu_ddp.yaml --num_processes "$GPUS" \
    -m dist_lora.train --config "$CONFIG" checkpoint.resume=latest "$@"
fi
exec .venv/bin/accelerate launch --config_file launch/single_gpu.yaml -m dist_lora.train --config "$CONFIG" \
  checkpoint.resume=latest "$@"
