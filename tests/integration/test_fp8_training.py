"""A tiny SDXL run on an fp8 base (UNet and text encoders, kohya's fp8_base) trains through the trainer, resumes
bit for bit, and exports a file with exactly the keys of a full-precision run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.config import config_from_dict
from dist_lora.models.fp8_base import fp8_layers
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import Preempted
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow
FP8 = {"base_dtype": "fp8", "fp8_text_encoders": True}


def _raw(model: Path, shards: Path, out: Path, model_options: dict, **checkpoint: object) -> dict:
    raw = tiny_train_config(model, shards, out, data={"shuffle_caption": True},
                            training={"max_steps": 6, "batch_size": 2}, checkpoint={"every_steps": 3, **checkpoint})
    raw["model"].update(model_options)
    return raw


def test_fp8_base_trains_resumes_bitwise_and_exports_the_same_keys(tiny_models: dict[str, Path],
                                                                  shapes_shards: Path, tmp_path: Path) -> None:
    model = tiny_models["sdxl"]
    straight = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "straight", FP8)))
    assert straight.model is not None
    assert len(fp8_layers(straight.model.unet)) > 50  # the frozen UNet was trained on in fp8
    with pytest.raises(Preempted):
        train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", FP8, stop_at_step=3)))
    resumed = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", FP8, resume="latest")))
    assert resumed.steps == 6
    a, b = load_file(str(tmp_path / "split" / "adapter.safetensors")), load_file(str(straight.adapter_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "full", {})))
    exported = load_file(str(full.adapter_path))
    assert exported.keys() == b.keys()
    assert all(exported[k].shape == b[k].shape and exported[k].dtype == b[k].dtype for k in b)
    # The fp8 run trained a different (rounded) base, so its adapter is close to, not equal to, the full one.
    ups = [k for k in b if "lora_up" in k]
    assert ups and any(not torch.equal(exported[k], b[k]) for k in ups)
    assert any(b[k].abs().sum() > 0 for k in ups)
