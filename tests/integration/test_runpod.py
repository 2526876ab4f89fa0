"""launch/runpod.sh through a container restart, with an isolated folder standing in for the pod's volume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_lora.config import config_from_dict, to_toml
from dist_lora.train.checkpoint import complete_checkpoints
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO, run_training

pytestmark = pytest.mark.slow
STEPS = 8


def _raw(model: Path, shards: Path, out: Path) -> dict:
    return tiny_train_config(model, shards, out, data={"num_workers": 2},
                             training={"batch_size": 2, "max_steps": STEPS}, checkpoint={"every_steps": 2})


def test_container_restart_resumes_from_the_latest_checkpoint(tiny_models: dict[str, Path], shapes_shards: Path,
                                                              tmp_path: Path) -> None:
    volume = tmp_path / "workspace"
    volume.mkdir()
    # The repository cloned on the volume, its .venv inside it (a link to this checkout and its built
    # environment, which a pod builds once with scripts/setup.sh); models, data and runs copied there.
    (volume / "dist_lora").symlink_to(REPO)
    shutil.copytree(tiny_models["sd15"], volume / "models" / "sd15")
    shutil.copytree(shapes_shards, volume / "data")
    run = volume / "runs" / "style"
    config = volume / "style.toml"
    config.write_text(to_toml(config_from_dict(_raw(volume / "models" / "sd15", volume / "data", run))))
    command = ["bash", str(volume / "dist_lora" / "launch" / "runpod.sh"), str(config)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "WANDB_DIR", "PIP_CACHE_DIR")}
    env.update(DIST_LORA_VOLUME=str(volume), OMP_NUM_THREADS="1")

    with open(tmp_path / "first.log", "w") as log:
        pod = subprocess.Popen(command, cwd=volume, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step-00000004" / "COMPLETE").exists():
            assert pod.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(pod.pid, signal.SIGKILL)  # the container stops: every process at once, nothing handled
        pod.wait()
    assert not (run / "adapter.safetensors").exists()
    latest = complete_checkpoints(run / "checkpoints")[-1]

    restarted = subprocess.run(command, cwd=volume, env=env, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and [r["checkpoint"] for r in summary["resumes"]] == [str(latest)]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (volume / "hf_cache").is_dir() and (volume / "wandb").is_dir()  # caches on the volume

    run_training(_raw(tiny_models["sd15"], shapes_shards, tmp_path / "straight"), tmp_path)
    straight = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    resumed = load_file(str(run / "adapter.safetensors"))
    assert straight.keys() == resumed.keys() and all(resumed[k].equal(straight[k]) for k in straight)
