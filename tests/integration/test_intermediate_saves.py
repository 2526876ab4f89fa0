"""Adapter files during training: kohya's names, metadata, pruning, loadable, and resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from safetensors import safe_open

from dist_lora.config import config_from_dict
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import Preempted
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _raw(model: Path, shards: Path, out: Path, **checkpoint: object) -> dict:
    # 48 samples per epoch in 4 shards of 12, in batches of 16: a batch per shard (12 samples and 4 of
    # padding), 4 steps per epoch, 12 steps in all.
    return tiny_train_config(model, shards, out, training={"batch_size": 16, "max_steps": 0, "epochs": 3},
                             output={"save_every_steps": 3, "save_every_epochs": 1, "save_last_n": 1},
                             checkpoint={"every_steps": 1, **checkpoint})


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_files_every_n_steps_and_epochs_pruned_loadable_and_resumable(tiny_models: dict[str, Path],
                                                                     shapes_shards: Path, tmp_path: Path) -> None:
    model, run = tiny_models["sd15"], tmp_path / "run"
    # Stopped at step 5 and resumed: the files keep coming, and pruning spans both runs.
    with pytest.raises(Preempted):
        train(config_from_dict(_raw(model, shapes_shards, run, stop_at_step=5)))
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["adapter-000001.safetensors",
                                                                 "adapter-step00000003.safetensors"]
    train(config_from_dict(_raw(model, shapes_shards, run, resume="latest")))
    # Steps 3, 6 and 9, epochs 1 (step 4) and 2 (step 8); the last step writes adapter.safetensors instead of
    # adapter-000003; save_last_n = 1 keeps the newest file of each kind.
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["adapter-000002.safetensors",
                                                                 "adapter-step00000009.safetensors",
                                                                 "adapter.safetensors"]
    by_epoch = _metadata(run / "adapter-000002.safetensors")
    by_step = _metadata(run / "adapter-step00000009.safetensors")
    assert (by_epoch["ss_steps"], by_epoch["ss_epoch"]) == ("8", "2")
    assert (by_step["ss_steps"], by_step["ss_epoch"]) == ("9", "3")
    assert (_metadata(run / "adapter.safetensors")["ss_steps"], _metadata(run / "adapter.safetensors")["ss_epoch"]) \
        == ("12", "3")
    assert not list(run.glob(".*.tmp"))  # written atomically: no temporary files left
    for name in ("adapter-000002.safetensors", "adapter-step00000009.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(str(model))
        pipe.load_lora_weights(str(run), weight_name=name)
        assert pipe.get_list_adapters()["unet"]
