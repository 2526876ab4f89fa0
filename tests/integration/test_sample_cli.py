"""`dist-lora sample`: a grid over a run's adapter files x weights x CFG scales, on 1 and 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_lora.config import config_from_dict
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO, free_port
from tests.integration.test_sampling import TOLERANCE, _diffusers_image

pytestmark = pytest.mark.slow
PROMPT = "a dlsks red square --w 64 --h 64 --s 2 --d 5 --n blurry"


def _sample(args: list[str], launch: bool = False) -> subprocess.CompletedProcess[str]:
    entry = ["-m", "dist_lora.cli", "sample", *args]
    if launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "cpu_2proc.yaml"), "--main_process_port", free_port(), *entry]
    else:
        cmd = [sys.executable, *entry]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_grid_over_files_weights_and_cfg(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    model, run = tiny_models["sd15"], tmp_path / "run"
    train(config_from_dict(tiny_train_config(
        model, shapes_shards, run, optimizer={"lr": 5e-2}, training={"max_steps": 4, "batch_size": 2},
        output={"save_every_steps": 2}, validation={"shards": str(shapes_shards), "every_steps": 2,
                                                    "batch_size": 16})))
    args = [str(model), str(run), "--out", str(tmp_path / "one"), "--weights", "0,1", "--cfg", "3,7",
            "--prompt", PROMPT]
    one = _sample(args)
    # Both files listed by step with the run's validation loss beside them.
    assert "2 file(s) x 2 weight(s) x 2 CFG scale(s) x 1 prompt(s)" in one.stdout
    assert "adapter-step00000002.safetensors  step 2  val_loss" in one.stdout
    assert "adapter.safetensors  step 4  val_loss" in one.stdout
    cells = sorted(p.name for p in (tmp_path / "one" / "00").iterdir())
    assert cells == sorted(f"{f}-w{w}-cfg{c}.png" for f in ("adapter", "adapter-step00000002") for w in (0, 1)
                           for c in (3, 7))
    sheet = Image.open(tmp_path / "one" / "grid-00.png")
    assert sheet.size == (4 * 64, 16 + 2 * (64 + 14))  # 2 weights x 2 CFG columns, one row per file
    cell = tmp_path / "one" / "00"
    # Weight 0 is the base model whichever the file; weight 1 of the final file is diffusers' rendering of it.
    assert np.array_equal(_pixels(cell / "adapter-w0-cfg7.png"), _pixels(cell / "adapter-step00000002-w0-cfg7.png"))
    want = _diffusers_image(model, run / "adapter.safetensors", "a dlsks red square", "blurry", 2, 5, 7.0, "euler_a")
    assert np.abs(_pixels(cell / "adapter-w1-cfg7.png") - want).max() <= TOLERANCE
    assert "<lora:adapter:1>" in Image.open(cell / "adapter-w1-cfg7.png").text["parameters"]  # type: ignore[attr-defined]
    # Two processes split the cells; the images are the same.
    _sample([*args[:3], str(tmp_path / "two"), *args[4:]], launch=True)
    for name in cells:
        assert np.abs(_pixels(cell / name) - _pixels(tmp_path / "two" / "00" / name)).max() <= TOLERANCE


def test_bad_input_is_named_before_loading(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dist_lora.cli", "sample", str(tiny_models["sd15"]),
                           str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o"), "--prompt", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.safetensors' does not exist" in proc.stderr


def test_bad_sample_settings_stop_training_before_loading(tiny_models: dict[str, Path], shapes_shards: Path,
                                                          tmp_path: Path) -> None:
    from dist_lora.config import to_toml
    from dist_lora.sampling.prompts import PromptError
    from dist_lora.train.trainer import preflight

    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "r")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    proc = subprocess.run([sys.executable, "-m", "dist_lora.cli", "train", "--config", str(recipe),
                           "sample.prompts=['a robot --ss eulr_a']"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sample.prompts[0]: unknown sampler 'eulr_a'. Did you mean 'euler_a'?" in proc.stderr
    assert "Loading pipeline components" not in proc.stderr  # stopped before any model loaded
    raw["sample"] = {"prompt_file": str(tmp_path / "nope.txt")}
    with pytest.raises(PromptError, match=r"sample\.prompt_file '.*nope\.txt' does not exist"):
        preflight(config_from_dict(raw))
