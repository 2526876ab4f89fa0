"""One stop protocol at every moment of a run, with SIGTERM sent to the whole process group (as Slurm
signals every process of a step, DataLoader workers included) and loader workers running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_lora.config import config_from_dict, to_toml
from dist_lora.utils.stop_signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO

pytestmark = pytest.mark.slow


def _recipe(tmp: Path, model: Path, shards: Path, run: Path, **sections: dict) -> Path:
    raw = tiny_train_config(model, shards, run, data={"num_workers": 2}, **sections)
    path = tmp / f"{run.name}.toml"
    path.write_text(to_toml(config_from_dict(raw)))
    return path


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """In its own session, so a signal to its process group reaches it and its workers only."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _handles_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _wait_until(condition, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _marker(run: Path) -> dict:
    return json.loads((run / PREEMPTED_MARKER).read_text())


def test_signal_during_start_up_stops_before_the_first_step(tiny_models: dict[str, Path], shapes_shards: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "startup"
    proc = _start(["-m", "dist_lora.train", "--config", str(_recipe(tmp_path, tiny_models["sdxl"], shapes_shards, run,
                                                                   checkpoint={"every_steps": 2}))])
    _wait_until(lambda: _handles_sigterm(proc.pid))  # the handler is in place; models are loading
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert _marker(run) == {"step": 0, "checkpoint": "", "reason": "SIGTERM", "exit_code": 75}
    assert not (run / "checkpoints").exists() and not (run / "adapter.safetensors").exists()


def test_sigterm_mid_epoch_with_workers_checkpoints_and_resumes(tiny_models: dict[str, Path], shapes_shards: Path,
                                                                tmp_path: Path) -> None:
    steps = {"training": {"max_steps": 10}, "checkpoint": {"every_steps": 100, "resume": "latest"}}
    straight = tmp_path / "straight"
    done = _start(["-m", "dist_lora.train", "--config", str(_recipe(tmp_path, tiny_models["sd15"], shapes_shards,
                                                                    straight, **steps))])
    assert done.wait(timeout=300) == 0
    run = tmp_path / "preempted"
    recipe = _recipe(tmp_path, tiny_models["sd15"], shapes_shards, run, **steps)
    proc = _start(["-m", "dist_lora.train", "--config", str(recipe)])
    metrics = run / "metrics.jsonl"
    _wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "DataLoader worker" not in stderr
    stopped = _marker(run)["step"]
    assert 3 <= stopped < 10 and (run / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").is_file()
    again = _start(["-m", "dist_lora.train", "--config", str(recipe)])
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    a, b = load_file(str(run / "adapter.safetensors")), load_file(str(straight / "adapter.safetensors"))
    assert all(a[k].equal(b[k]) for k in b)
    # Metrics hold each step once; the summary keeps the run's first loss and records the resume.
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    straight_records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["first_loss"] == records[0]["loss"]
    assert [r["step"] for r in summary["resumes"]] == [stopped]


@pytest.mark.parametrize(("moment", "expect_stop"), [("checkpoint:2", True), ("export", False),
                                                     ("after_export", False)])
def test_signal_while_writing_lets_the_write_finish(moment: str, expect_stop: bool, tiny_models: dict[str, Path],
                                                    shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_models["sd15"], shapes_shards, run, training={"max_steps": 4},
                     checkpoint={"every_steps": 2})
    proc = _start(["-m", "dist_lora.train", "--config", str(recipe)], env={"DIST_LORA_SIGNAL_AT": moment})
    _, stderr = proc.communicate(timeout=300)
    checkpoint = run / "checkpoints" / "step-00000002"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "adapter_state.safetensors").is_file()
    if expect_stop:  # stopped right after the checkpoint it was writing
        assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
        assert _marker(run)["step"] == 2 and _marker(run)["checkpoint"].endswith("step-00000002")
        assert not (run / "adapter.safetensors").exists()
    else:  # the run had finished training: the adapter is complete and the status stays 0
        assert proc.returncode == 0, stderr[-3000:]
        assert not (run / PREEMPTED_MARKER).exists()
        assert load_file(str(run / "adapter.safetensors"))


def test_signal_while_caching_keeps_finished_shards_and_resumes(tiny_models: dict[str, Path], shapes_shards: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "cached"
    args = ["-m", "dist_lora.cli", "cache", str(shapes_shards), str(out), "--model", str(tiny_models["sd15"])]
    proc = _start(args, env={"DIST_LORA_SIGNAL_AT": "cache_shard:1"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "caching stopped (SIGTERM) after 1 shard" in stderr
    assert not (out / "manifest.json").exists()
    again = _start(args)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert "(1 already done)" in stdout and (out / "manifest.json").is_file()
