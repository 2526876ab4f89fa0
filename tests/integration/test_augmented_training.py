"""Training with kohya's augmentations and masked loss: exact resume, masks that take effect, and cached
mirrored latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from dist_lora.config import config_from_dict
from dist_lora.data.cache import CacheOptions, cache_dataset
from dist_lora.data.manifest import ShardDataError
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.stream import LATENT_FLIP_MEMBER, decode_image, pixels_to_unit_range
from dist_lora.data.synthetic import write_shapes_dataset
from dist_lora.data.tar_samples import tar_samples
from dist_lora.errors import DistLoraError
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import Preempted
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _images(root: Path, masks: str | None = None) -> Path:
    """8 shape images; with ``masks`` ("half", "black" or "white") a mask folder beside them."""
    src = write_shapes_dataset(root / "src", images=8)
    if masks is not None:
        for image in sorted(src.rglob("*.png")):
            width, height = Image.open(image).size
            mask = np.full((height, width, 3), 0 if masks == "black" else 255, dtype=np.uint8)
            if masks == "half":
                mask[:, : width // 2] = 0
            target = root / "masks" / image.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(target)
    return src


def _prepared(root: Path, masks: str | None = None, **options: object) -> Path:
    src = _images(root, masks)
    mask_dir = str(root / "masks") if masks else ""
    prepare_dataset(src, root / "shards", PrepareOptions(resolution=64, shard_size=4, mask_dir=mask_dir, **options))
    return root / "shards"


def _raw(model: Path, shards: Path, out: Path, **sections: dict[str, object]) -> dict:
    return tiny_train_config(model, shards, out, **{"training": {"batch_size": 2, "max_steps": 4},
                                                    "optimizer": {"weight_decay": 0.0}, **sections})


def test_resume_is_exact_with_every_augmentation_and_masks(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """SDXL (the crop conditioning moves with each random crop and flip), a loader worker, colour too."""
    shards = _prepared(tmp_path / "data", "half", random_crop=True)

    def raw(run: str, **checkpoint: object) -> dict:
        return _raw(tiny_models["sdxl"], shards, tmp_path / run,
                    data={"flip_aug": True, "color_aug": True, "num_workers": 1, "shuffle_caption": True},
                    training={"batch_size": 2, "max_steps": 6},
                    checkpoint={"every_steps": 3, **checkpoint}, logging={"record_sample_keys": True})

    train(config_from_dict(raw("straight")))
    with pytest.raises(Preempted):
        train(config_from_dict(raw("split", stop_at_step=3)))
    train(config_from_dict(raw("split", resume="latest")))
    straight, split = (load_file(str(tmp_path / r / "adapter.safetensors")) for r in ("straight", "split"))
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)


def test_masks_weight_the_loss(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """All-zero masks: no gradient reaches the adapters (kohya's LoRA starts with lora_up = 0, so it stays
    0). All-one masks: the run equals one without masks, bit for bit. masked_loss = false ignores masks.
    The held-out set's loss is weighed alike: 0 under all-zero masks, the unmasked value under all-one."""
    runs, val_losses = {}, {}

    def raw(shards: Path, run: Path, masked_loss: bool = True) -> dict:
        return _raw(tiny_models["sd15"], shards, run, training={"batch_size": 2, "max_steps": 4,
                                                                "masked_loss": masked_loss},
                    validation={"shards": str(shards / "val"), "every_steps": 2})

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["val_loss"] for x in (run / "validation.jsonl").read_text().splitlines()]

    for masks in ("black", "white", None):
        shards = _prepared(tmp_path / f"data-{masks}", masks, val_fraction=0.25)
        run = tmp_path / f"run-{masks}"
        train(config_from_dict(raw(shards, run)))
        runs[masks], val_losses[masks] = load_file(str(run / "adapter.safetensors")), losses(run)
    ups = [k for k in runs["black"] if k.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(runs["black"][k]) == 0 for k in ups)
    assert all(torch.count_nonzero(runs[None][k]) > 0 for k in ups)
    assert all(torch.equal(runs["white"][k], runs[None][k]) for k in runs[None])
    assert len(val_losses[None]) == 2 and all(v > 0 for v in val_losses[None])
    assert val_losses["black"] == [0.0, 0.0] and val_losses["white"] == val_losses[None]
    ignored = tmp_path / "run-ignored"
    train(config_from_dict(raw(tmp_path / "data-black" / "shards", ignored, masked_loss=False)))
    got = load_file(str(ignored / "adapter.safetensors"))
    assert all(torch.equal(got[k], runs[None][k]) for k in runs[None])
    assert losses(ignored) == val_losses[None]


def test_cached_mirrored_latents(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    shards = _prepared(tmp_path / "data")
    cached, plain = tmp_path / "cached", tmp_path / "cached-plain"
    cache_dataset(shards, cached, CacheOptions(model=str(model), text=False, flip_aug=True))
    cache_dataset(shards, plain, CacheOptions(model=str(model), text=False))
    # The mirrored member is the VAE posterior of the mirrored image, computed here independently.
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    sample = next(s for s in tar_samples(str(cached / "train-000000.tar"), "train-000000.tar")
                  if isinstance(s, dict))
    pixels = pixels_to_unit_range(decode_image(sample["png"]).flip(-1)[None], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist
    stored = load_safetensors_bytes(sample[LATENT_FLIP_MEMBER])
    torch.testing.assert_close(stored["mean"], expected.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored["std"], expected.std[0], atol=1e-5, rtol=1e-5)

    flipped = tmp_path / "run-flip"
    train(config_from_dict(_raw(model, cached, flipped, data={"flip_aug": True})))
    train(config_from_dict(_raw(model, cached, tmp_path / "run-plain")))
    a, b = (load_file(str(tmp_path / r / "adapter.safetensors")) for r in ("run-flip", "run-plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # some samples trained mirrored
    with pytest.raises(DistLoraError, match=r"flip_aug \(data\) needs the latents of the mirrored images.*--flip-aug"):
        train(config_from_dict(_raw(model, plain, tmp_path / "x", data={"flip_aug": True})))
    with pytest.raises(DistLoraError, match=r"color_aug \(data\) changes the pixels every epoch"):
        train(config_from_dict(_raw(model, cached, tmp_path / "x", data={"color_aug": True})))
    cropped = _prepared(tmp_path / "data-crop", random_crop=True)
    with pytest.raises(ShardDataError, match=r"holds 8 sample\(s\) prepared for random cropping"):
        cache_dataset(cropped, tmp_path / "y", CacheOptions(model=str(model)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
