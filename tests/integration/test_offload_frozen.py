"""model.offload_frozen: the VAE and frozen text encoders live in host memory during the UNet's steps, come
to the device to encode, and for whole sample and validation rounds; the run is the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from torch import nn

from dist_lora.config import config_from_dict
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.synthetic import write_shapes_dataset
from dist_lora.train import trainer
from tests.conftest import tiny_train_config
from tests.integration.test_validation import SAMPLE_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offload")
    write_shapes_dataset(root / "src", images=12, repeats=1)
    prepare_dataset(root / "src", root / "shards", PrepareOptions(resolution=64, shard_size=4, val_fraction=0.25))
    return root / "shards"


def _raw(model: Path, shards: Path, out: Path, offload: bool) -> dict[str, dict[str, Any]]:
    raw = tiny_train_config(model, shards, out, training={"max_steps": 3, "batch_size": 2},
                            validation={"shards": str(shards / "val"), "every_steps": 2, "batch_size": 3},
                            sample={"prompts": SAMPLE_PROMPTS[:1], "every_steps": 2})
    raw["model"]["offload_frozen"] = offload
    return raw


def test_encoders_are_offloaded_during_steps_and_the_run_is_unchanged(
        tiny_models: dict[str, Path], split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_models["sdxl"]  # two text encoders
    plain = trainer.train(config_from_dict(_raw(model, split, tmp_path / "plain", offload=False)))

    seen: list[tuple[str, bool, bool, tuple[bool, ...]]] = []  # (module run, training?, VAE home?, encoders home?)
    build = trainer.build_setup

    def watched(*args: Any, **kwargs: Any) -> Any:
        setup = build(*args, **kwargs)
        offload, vae, encoders = setup.offload, setup.components.vae, setup.frozen_text_encoders
        assert offload is not None and vae is not None and len(encoders) == 2

        def record(name: str) -> Any:
            def hook(module: nn.Module, inputs: Any) -> None:
                seen.append((name, setup.components.unet.training, offload.is_home(vae),
                             tuple(offload.is_home(e) for e in encoders)))
            return hook

        setup.components.unet.register_forward_pre_hook(record("unet"))
        vae.encoder.register_forward_pre_hook(record("vae"))
        vae.decoder.register_forward_pre_hook(record("vae decode"))
        encoders[0].register_forward_pre_hook(record("text"))
        return setup

    monkeypatch.setattr(trainer, "build_setup", watched)
    offloaded = trainer.train(config_from_dict(_raw(model, split, tmp_path / "offloaded", offload=True)))

    steps = [s for s in seen if s[0] == "unet" and s[1]]
    assert len(steps) == 3 and all(s[2:] == (True, (True, True)) for s in steps), steps
    # Training encodes the batch: the VAE alone on the device, then the text encoders alone.
    assert {s[2:] for s in seen if s[0] == "vae" and s[1]} == {(False, (True, True))}
    assert {s[2:] for s in seen if s[0] == "text" and s[1]} == {(True, (False, False))}
    # Sample and validation rounds (UNet in eval mode) have everything on the device for the whole round.
    rounds = [s for s in seen if not s[1]]
    assert {s[0] for s in rounds} == {"unet", "vae", "vae decode", "text"}
    assert all(s[2:] == (False, (False, False)) for s in rounds)

    assert offloaded.losses == plain.losses
    a, b = load_file(plain.adapter_path), load_file(offloaded.adapter_path)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for run in ("validation.jsonl",):
        assert (plain.run_dir / run).read_text() == (offloaded.run_dir / run).read_text()
    images = sorted((plain.run_dir / "samples").rglob("*.png"))
    assert images and [p.read_bytes() for p in images] == \
        [(offloaded.run_dir / p.relative_to(plain.run_dir)).read_bytes() for p in images]
