"""slurm/train.sbatch run end to end with stand-ins for srun and scontrol (2 tasks on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_lora.config import config_from_dict, to_toml
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO, free_port

pytestmark = pytest.mark.slow

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: start SLURM_NTASKS copies of the command, as srun does on one node.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "$SCONTROL_LOG"; fi
"""


def _bin(tmp: Path) -> Path:
    folder = tmp / "bin"
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def test_sbatch_caches_trains_and_requeues(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sd15"], tmp_path / "cached", tmp_path / "run",
                            training={"batch_size": 2, "max_steps": 4}, checkpoint={"every_steps": 2})
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    env = {**os.environ, "PATH": f"{_bin(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1",
           "SLURM_SUBMIT_DIR": str(REPO), "DIST_LORA_PYTHON": sys.executable, "MASTER_PORT": free_port(),
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "DIST_LORA_CACHE_SRC": str(shapes_shards),
           "DIST_LORA_CACHE_OUT": str(tmp_path / "cached"), "DIST_LORA_CACHE_MODEL": str(tiny_models["sd15"])}
    cmd = ["bash", str(REPO / "slurm" / "train.sbatch"), str(recipe), "checkpoint.stop_at_step=2"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert (tmp_path / "cached" / "manifest.json").is_file()  # both tasks cached their share
    assert "requeueing" in first.stdout and (tmp_path / "scontrol.log").read_text().strip() == "requeue 4242"
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    # The requeued job: the cache is done, training resumes from step 2 and finishes.
    second = subprocess.run(cmd[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cached" not in second.stdout and (tmp_path / "run" / "adapter.safetensors").is_file()
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"steps": 4' in summary and "step-00000002" in summary
