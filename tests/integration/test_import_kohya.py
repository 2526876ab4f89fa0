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


def test_an_imported_locon_config_prepares_caches_and_trains(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path / "img", images=6, repeats=2)
    config = {"LoRA_type": "Kohya LoCon", "pretrained_model_name_or_path": str(tiny_models["sd15"]),
              "train_data_dir": str(tmp_path / "img"), "output_dir": str(tmp_path / "run"), "output_name": "imported",
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
    cached = json.loads((tmp_path / "imported" / "cached" / "manifest.json").read_text())["cache"]
    assert cached["text"] and cached["clip_skip"] == 2
    with safe_open(str(tmp_path / "run" / "imported.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_clip_skip"] == "2" and (args["algo"], args["conv_dim"]) == ("locon", "2")
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)  # LoCon: the 3x3 convolutions too
    assert not any(k.startswith("lora_te_") for k in keys)  # text_encoder_lr 0: the UNet alone
