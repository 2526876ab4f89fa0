#!/usr/bin/env bash
# Train on a RunPod pod. Everything that must survive a pod stop or a container restart lives on the
# network volume (/workspace, or DIST_LORA_VOLUME): the repository with its .venv (clone it there), the
# Hugging Face and pip caches, wandb files, the shards and the run directories.
#
#   cd /workspace && git clone <dist_lora repository> && cd dist_lora
#   bash launch/runpod.sh configs/sdxl.toml output.dir=/workspace/runs/my_style
#
# A stopped, preempted or restarted pod is resumed by running the same command again: the run continues
# from its latest complete checkpoint (set checkpoint.every_steps in the config). SSH sessions do not
# inherit the pod's environment variables, so the ones that matter are set here.
set -euo pipefail
cd "$(dirname "$0")/.."
VOLUME=${DIST_LORA_VOLUME:-/workspace}
[ -d "$VOLUME" ] || { echo "runpod.sh: the volume '$VOLUME' does not exist; attach a network volume at" \
  "/workspace, or set DIST_LORA_VOLUME to where it is mounted." >&2; exit 2; }
case "$(pwd -P)/" in
  "$(cd "$VOLUME" && pwd -P)"/*) ;;
  *) echo "runpod.sh: warning: the repository $(pwd) is not on the volume $VOLUME: its .venv is rebuilt" \
       "after every container restart. Clone it under $VOLUME." >&2 ;;
esac
CONFIG=${1:?usage: launch/runpod.sh CONFIG.toml [section.key=value ...]}
shift
export HF_HOME=${HF_HOME:-$VOLUME/hf_cache}
export WANDB_DIR=${WANDB_DIR:-$VOLUME/wandb}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$VOLUME/pip_cache}
mkdir -p "$HF_HOME" "$WANDB_DIR"
bash scripts/setup.sh  # .venv lives in the repository, on the volume: built once, reused after a restart
PYTHON=.venv/bin/python
GPUS=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
if [ "$GPUS" -gt 1 ]; then
  exec "$PYTHON" -m accelerate.commands.launch --config_file launch/multi_gpu_ddp.yaml --num_processes "$GPUS" \
    -m dist_lora.train --config "$CONFIG" checkpoint.resume=latest "$@"
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file launch/single_gpu.yaml -m dist_lora.train \
  --config "$CONFIG" checkpoint.resume=latest "$@"
