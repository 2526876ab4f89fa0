"""An imported kohya_ss config, run as its prepare.sh says: prepare, cache, train, on the tiny SD 1.5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from dist_lora.cli import main
from dist_lora.data.synthetic import write_shapes_dataset

DATASET = """
[general]
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 128
batch_size = 2

  [[datasets.subsets]]
  image_dir = "img/2_dlsks shapes"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "more/2_dlsks shapes"
  shuffle_caption = true
  caption_dropout_rate = 0.5

  [[datasets.subsets]]
  image_dir = "reg/2_dlsks shapes"
  is_reg = true
"""


def test_an_imported_locon_config_prepares_caches_and_trains(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """With a dataset config of three subsets (one of regularization images)."""
    for folder, seed in (("img", 0), ("more", 1), ("reg", 2)):
        write_shapes_dataset(tmp_path / folder, images=3, seed=seed)
    (tmp_path / "dataset.toml").write_text(DATASET)
    config = {"LoRA_type": "Kohya LoCon", "pretrained_model_name_or_path": str(tiny_models["sd15"]),
              "train_data_dir": "", "dataset_config": str(tmp_path / "dataset.toml"),
              "output_dir": str(tmp_path / "run"), "output_name": "imported",
              "network_dim": 4, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1, "max_resolution": "128,128",
              "enable_bucket": False, "train_batch_size": 2, "max_train_steps": 2, "optimizer": "AdamW",
              "learning_rate": 1e-3, "text_encoder_lr": 0, "clip_skip": 2, "mixed_precision": "no",
              "save_precision": "fp16", "cache_latents": True, "sdxl_cache_text_encoder_outputs": True,
              "xformers": "none", "flip_aug": False, "max_data_loader_n_workers": "0"}
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(config))
    assert main(["import-kohya", str(path), str(tmp_path / "imported")]) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(tmp_path / "imported" / "prepare.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "imported" / "cached" / "manifest.json").read_text())
    assert manifest["cache"]["clip_skip"] == 2 and manifest["num_samples_with_repeats"] == 2 * 3 + 3 + 3
    assert [s["captions"] for s in manifest["subsets"]] == [
        {"keep_tokens": 1}, {"keep_tokens": 1, "shuffle": True, "caption_dropout": 0.5}, {"keep_tokens": 1}]
    assert manifest["num_reg_samples"] == 3
    with safe_open(str(tmp_path / "run" / "imported.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_clip_skip"] == "2" and (args["algo"], args["conv_dim"]) == ("locon", "2")
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)  # LoCon: the 3x3 convolutions too
    assert not any(k.startswith("lora_te_") for k in keys)  # text_encoder_lr 0: the UNet alone
