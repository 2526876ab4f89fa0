"""Checkpoints, exact resume, crashes, non-finite steps and preemption, on real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_lora.config import config_from_dict
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import PREEMPTED_EXIT_CODE, Preempted
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO, free_port, run_training

pytestmark = pytest.mark.slow


def _raw(model: Path, shards: Path, out: Path, steps: int = 6, **checkpoint: object) -> dict:
    # Caption transforms are on, so an exact resume also needs the same augment randomness.
    return tiny_train_config(model, shards, out, optimizer={"lr": 1e-2},
                             data={"shuffle_caption": True, "tag_dropout": 0.3, "caption_dropout": 0.1},
                             scheduler={"type": "cosine", "warmup_steps": 2},
                             training={"max_steps": steps, "batch_size": 2},
                             checkpoint={"every_steps": 3, **checkpoint},
                             logging={"record_sample_keys": True})


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


def _assert_preempted(returncode: int, stderr: str, run: Path, step: int | None = None) -> None:
    """Each worker exits 75; torchrun (under accelerate launch) reports that as its own failure, so the
    run leaves preempted.json for job scripts."""
    assert returncode != 0 and re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT_CODE}\b", stderr), stderr[-3000:]
    marker = json.loads((run / "preempted.json").read_text())
    assert marker["exit_code"] == PREEMPTED_EXIT_CODE and Path(marker["checkpoint"]).is_dir()
    if step is not None:
        assert marker["step"] == step


def _keys_after(run: Path, micro_step: int) -> list[tuple[int, list[str]]]:
    rows = [json.loads(x) for x in (run / "sample_keys.jsonl").read_text().splitlines()]
    return [(r["rank"], r["keys"]) for r in rows if r["micro_step"] >= micro_step]


def test_exact_resume_single_process(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    model = tiny_models["sdxl"]
    train(config_from_dict(_raw(model, shapes_shards, tmp_path / "straight")))
    with pytest.raises(Preempted) as stop:
        train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", stop_at_step=3)))
    assert stop.value.step == 3 and not (tmp_path / "split" / "adapter.safetensors").exists()
    assert json.loads((tmp_path / "split" / "preempted.json").read_text())["step"] == 3
    resumed = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", resume="latest")))
    assert resumed.steps == 6 and not (tmp_path / "split" / "preempted.json").exists()
    _assert_bitwise(_adapter(tmp_path / "split"), _adapter(tmp_path / "straight"))
    assert _keys_after(tmp_path / "split", 3)[-3:] == _keys_after(tmp_path / "straight", 3)[-3:]
    # Older checkpoints are pruned only down to `keep`, and each is marked complete.
    steps = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert steps == ["step-00000003", "step-00000006"]
    # The data position went into the checkpoint.
    ranks = tmp_path / "split" / "checkpoints" / "step-00000003" / "ranks"
    progress = json.loads((ranks / "data_position-rank00000.json").read_text())
    # One reader (no workers) 3 batches into its first shard: the resume opened that shard alone.
    assert progress["epoch"] == 0 and progress["batches"] == 3 and progress["workers"] == [[0, 3, 0]]


FORMAT_ONE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1" / "step-00000003"


def test_format_one_checkpoint_resumes(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    """A checkpoint written by the earlier format (tests/fixtures/checkpoint_v1: every rank's data position
    and RNG in one file, the average's count in ema.json) resumes: the train state, optimizer, schedule
    and average carry on, and its data position (sample keys) continues at the sample, none used twice."""

    def raw(run: str, **checkpoint: object) -> dict:
        made = _raw(tiny_models["sd15"], shapes_shards, tmp_path / run, **checkpoint)
        made["network"] = {"rank": 1, "alpha": 1.0}
        made["ema"] = {"decay": 0.8}
        return made

    shutil.copytree(FORMAT_ONE, tmp_path / "old" / "checkpoints" / FORMAT_ONE.name)
    resumed = train(config_from_dict(raw("old", resume="latest")))
    assert resumed.steps == 6
    history = json.loads((FORMAT_ONE / "run_state.json").read_text())
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert summary["first_loss"] == history["first_loss"] and [r["step"] for r in summary["resumes"]] == [3]
    old_position = json.loads((FORMAT_ONE / "data_progress.json").read_text())[0]
    used_before = set(old_position["consumed"] + old_position["last"])
    trained_after = [k for _, keys in _keys_after(tmp_path / "old", 3) for k in keys if not k.startswith("pad:")]
    assert len(trained_after) == 6 and len(set(trained_after)) == 6 and not used_before & set(trained_after)
    # What the resumed run wrote is in the current format, counting on from the old state.
    written = tmp_path / "old" / "checkpoints" / "step-00000006"
    assert json.loads((written / "checkpoint.json").read_text())["format"] == 2
    assert json.loads((written / "train_state.json").read_text())["step"] == 6
    optimizer = torch.load(written / "optimizer.pt", weights_only=True)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {6.0}  # Adam's count went on
    with safe_open(str(written / "ema.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["state"]) == {"updates": 6}
    assert (written / "ranks" / "data_position-rank00000.json").is_file()


# DDP's exact resume on 2 processes: test_sigusr1_to_one_rank_checkpoints_both_and_resumes (and the Slurm tier).
# ZeRO-2 saves and loads through the same engine checkpoint calls as ZeRO-3; stage 3 adds partitioned
# parameters on top of the partitioned optimizer state, so it is the stage that is run here (CI time).
@pytest.mark.parametrize("launch", ["zero3.yaml"])
def test_exact_resume_two_processes(launch: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                    tmp_path: Path) -> None:
    """With the weight average exported and scale_weight_norms on: both write into ZeRO-3's partitioned
    master weights after each step, and the average lives outside the engine's checkpoint."""
    model = tiny_models["sd15"]

    def raw(run: str, **checkpoint: object) -> dict:
        made = _raw(model, shapes_shards, tmp_path / run, **checkpoint)
        made["training"]["scale_weight_norms"] = 2e-3
        made["ema"] = {"decay": 0.8, "export": True}
        return made

    run_training(raw("straight"), tmp_path, launch=launch)
    stopped = run_training(raw("split", stop_at_step=3), tmp_path, launch=launch, check=False)
    _assert_preempted(stopped.returncode, stopped.stderr, tmp_path / "split", step=3)
    run_training(raw("split", resume="latest"), tmp_path, launch=launch)
    _assert_bitwise(_adapter(tmp_path / "split"), _adapter(tmp_path / "straight"))  # the average
    last = Path("checkpoints") / "step-00000006" / "adapter_state.safetensors"  # the trained weights
    _assert_bitwise(load_file(str(tmp_path / "split" / last)), load_file(str(tmp_path / "straight" / last)))
    assert _keys_after(tmp_path / "split", 3) == _keys_after(tmp_path / "straight", 3)
    metrics = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("keys_scaled", 0) > 0 for m in metrics), metrics


def test_kill_during_checkpoint_keeps_previous(tiny_models: dict[str, Path], shapes_shards: Path,
                                               tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    run_training(_raw(model, shapes_shards, tmp_path / "straight"), tmp_path)
    killed = run_training(_raw(model, shapes_shards, tmp_path / "crash"), tmp_path, check=False,
                          env={"DIST_LORA_KILL_DURING_CHECKPOINT": "6"})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert (checkpoints / "step-00000003" / "COMPLETE").is_file()
    assert not (checkpoints / "step-00000006").exists()  # the half-written one never got its final name
    run_training(_raw(model, shapes_shards, tmp_path / "crash", resume="latest"), tmp_path)
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000003")
    _assert_bitwise(_adapter(tmp_path / "crash"), _adapter(tmp_path / "straight"))


def test_nan_on_one_rank_skips_the_step_on_both(tiny_models: dict[str, Path], shapes_shards: Path,
                                                tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    raw = _raw(model, shapes_shards, tmp_path / "run", steps=4, every_steps=1, keep=4)
    run_training(raw, tmp_path, launch="cpu_2proc.yaml", env={"DIST_LORA_INJECT_NAN": "1:2"})
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    # Rank 0 saw a finite loss at step 2 yet did not step: its state after step 2 is that after step 1.
    ckpt = tmp_path / "run" / "checkpoints"
    _assert_bitwise(load_file(str(ckpt / "step-00000002" / "adapter_state.safetensors")),
                    load_file(str(ckpt / "step-00000001" / "adapter_state.safetensors")))
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "run").values())
    # With a limit of one, the same poisoned step stops the run on both ranks with a diagnostic.
    raw = _raw(model, shapes_shards, tmp_path / "stop", steps=4)
    raw["training"]["max_consecutive_skips"] = 1
    stopped = run_training(raw, tmp_path, launch="cpu_2proc.yaml", env={"DIST_LORA_INJECT_NAN": "1:2"}, check=False)
    assert stopped.returncode != 0 and "non-finite loss or gradient" in stopped.stderr
    assert not (tmp_path / "stop" / "adapter.safetensors").exists()


def _worker_pids(recipe_marker: str) -> dict[int, int]:
    """RANK -> pid of the training workers whose command line mentions ``recipe_marker``."""
    out = subprocess.run(["pgrep", "-f", f"dist_lora.train --config .*{recipe_marker}"], capture_output=True,
                         text=True).stdout.split()
    ranks = {}
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(e.split(b"=", 1) for e in env if b"=" in e)
        if b"RANK" in values and b"LOCAL_RANK" in values:
            ranks[int(values[b"RANK"])] = pid
    return ranks


def test_sigusr1_to_one_rank_checkpoints_both_and_resumes(tiny_models: dict[str, Path], shapes_shards: Path,
                                                          tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    steps = 12
    run_training(_raw(model, shapes_shards, tmp_path / "straight", steps=steps, every_steps=100), tmp_path,
                 launch="cpu_2proc.yaml")
    raw = _raw(model, shapes_shards, tmp_path / "preempt", steps=steps, every_steps=100)
    from dist_lora.config import to_toml
    recipe = tmp_path / "preempt_recipe.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", free_port(), "-m", "dist_lora.train", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "preempt" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    pids = _worker_pids("preempt_recipe")
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    _assert_preempted(proc.returncode, stderr, tmp_path / "preempt")
    stopped_at = [p.name for p in (tmp_path / "preempt" / "checkpoints").iterdir()]
    assert len(stopped_at) == 1 and stopped_at[0] != f"step-{steps:08d}"
    raw["checkpoint"]["resume"] = "latest"
    run_training(raw, tmp_path, launch="cpu_2proc.yaml")
    _assert_bitwise(_adapter(tmp_path / "preempt"), _adapter(tmp_path / "straight"))


def test_weight_average_resumes_exactly_and_is_what_gets_exported(tiny_models: dict[str, Path], shapes_shards: Path,
                                                                  tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    ema = {"decay": 0.8, "update_every": 2, "export": True}

    def raw(name: str, **checkpoint: object) -> dict:
        made = _raw(model, shapes_shards, tmp_path / name, **checkpoint)
        made["ema"] = dict(ema)
        made["output"]["save_precision"] = "fp32"
        return made

    train(config_from_dict(raw("straight", every_steps=1, keep=10)))
    with pytest.raises(Preempted):
        train(config_from_dict(raw("split", stop_at_step=3)))
    train(config_from_dict(raw("split", resume="latest")))
    _assert_bitwise(_adapter(tmp_path / "split"), _adapter(tmp_path / "straight"))
    # The average by hand from the trained weights of every step (diffusers' EMAModel decay warm-up).
    checkpoints = tmp_path / "straight" / "checkpoints"
    average: dict[str, torch.Tensor] = {}
    for n, step in enumerate((2, 4, 6), start=1):
        weights = load_file(str(checkpoints / f"step-{step:08d}" / "adapter_state.safetensors"))
        decay = 0.0 if n == 1 else min(0.8, n / (9 + n))
        average = weights if not average else {k: decay * average[k] + (1 - decay) * w for k, w in weights.items()}
    saved = load_file(str(checkpoints / "step-00000006" / "ema.safetensors"))
    assert saved.keys() == average.keys()
    for name, want in average.items():
        torch.testing.assert_close(saved[name], want, rtol=1e-5, atol=1e-7, msg=name)
    # The file holds the average, not the trained weights: a run without ema.export writes the latter, and the
    # average trained nothing differently.
    plain = raw("plain")
    plain["ema"]["export"] = False
    train(config_from_dict(plain))
    final = "step-00000006/adapter_state.safetensors"
    _assert_bitwise(load_file(str(tmp_path / "plain" / "checkpoints" / final)), load_file(str(checkpoints / final)))
    exported, trained = _adapter(tmp_path / "straight"), _adapter(tmp_path / "plain")
    assert exported.keys() == trained.keys()
    assert any(not torch.equal(exported[k], trained[k]) for k in exported if "lora_up" in k)


def test_boft_with_module_dropout_resumes_bitwise(tiny_models: dict[str, Path], shapes_shards: Path,
                                                  tmp_path: Path) -> None:
    """OFT/BOFT blocks, their optimizer state and the generator their module dropout draws from are all in
    the checkpoint: stopped at step 2 and resumed, the run ends where the straight one does."""
    def raw(out: Path, **checkpoint: object) -> dict:
        config = _raw(tiny_models["sd15"], shapes_shards, out, steps=4, every_steps=2, **checkpoint)
        config["network"].update(type="boft", dropout=0.3)
        return config

    train(config_from_dict(raw(tmp_path / "straight")))
    with pytest.raises(Preempted):
        train(config_from_dict(raw(tmp_path / "split", stop_at_step=2)))
    train(config_from_dict(raw(tmp_path / "split", resume="latest")))
    straight = _adapter(tmp_path / "straight")
    assert any(k.endswith(".oft_blocks") and t.abs().max() > 0 for k, t in straight.items())
    _assert_bitwise(_adapter(tmp_path / "split"), straight)
