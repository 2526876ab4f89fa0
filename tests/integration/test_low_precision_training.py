"""A tiny SDXL run on an fp8 base (UNet and text encoders, kohya's fp8_base), an nf4 or an int8 base trains
through the trainer, resumes bit for bit, and exports a file with exactly the keys of a full-precision run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.config import config_from_dict
from dist_lora.models.fp8_base import fp8_layers
from dist_lora.models.quantized_base import quantized_layers
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import Preempted
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow
BASES = {"fp8": {"base_dtype": "fp8", "fp8_text_encoders": True}, "nf4": {"base_dtype": "nf4"},
         "int8": {"base_dtype": "int8"}}


def _raw(model: Path, shards: Path, out: Path, model_options: dict, **checkpoint: object) -> dict:
    raw = tiny_train_config(model, shards, out, data={"shuffle_caption": True},
                            training={"max_steps": 6, "batch_size": 2}, checkpoint={"every_steps": 3, **checkpoint})
    raw["model"].update(model_options)
    return raw


@pytest.fixture(scope="module")
def full_precision(tiny_models: dict[str, Path], shapes_shards: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same run on the full-precision base: the adapter file every low-precision run is held against."""
    out = tmp_path_factory.mktemp("full")
    return load_file(str(train(config_from_dict(_raw(tiny_models["sdxl"], shapes_shards, out, {}))).adapter_path))


@pytest.mark.parametrize("base", sorted(BASES))
def test_a_low_precision_base_trains_resumes_bitwise_and_exports_the_same_keys(
        base: str, tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path,
        full_precision: dict[str, torch.Tensor]) -> None:
    model, options = tiny_models["sdxl"], BASES[base]
    straight = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "straight", options)))
    assert straight.model is not None
    stored = fp8_layers(straight.model.unet) if base == "fp8" else quantized_layers(straight.model.unet)
    assert len(stored) > 50  # the frozen UNet was trained on in that format
    with pytest.raises(Preempted):
        train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", options, stop_at_step=3)))
    resumed = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", options, resume="latest")))
    assert resumed.steps == 6
    a, b = load_file(str(tmp_path / "split" / "adapter.safetensors")), load_file(str(straight.adapter_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = full_precision
    assert exported.keys() == b.keys()
    assert all(exported[k].shape == b[k].shape and exported[k].dtype == b[k].dtype for k in b)
    # The run trained a different (rounded) base, so its adapter is close to, not equal to, the full one.
    ups = [k for k in b if "lora_up" in k]
    assert ups and any(not torch.equal(exported[k], b[k]) for k in ups)
    assert any(b[k].abs().sum() > 0 for k in ups)
