"""Load-time augmentation (flip, kohya's colour, random crop), bucket_no_upscale and loss masks."""

from __future__ import annotations

import colorsys
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_lora.data.augment import Augment, AugmentPolicy, Draw, apply, draw, kohya_gamma, shift_hue
from dist_lora.data.buckets import BucketSpec, no_upscale_placement
from dist_lora.data.kohya import DatasetFolderError, SourceImage
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.prepare_sources import image_options
from dist_lora.data.shards import ShardLoader
from dist_lora.train.losses import mask_weights
from tests.conftest import shard_members


def _array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_flip_mirrors_pixels_mask_and_the_crop() -> None:
    pixels = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    mask = torch.randint(0, 256, (1, 64, 96), dtype=torch.uint8)
    # A 200x100 image scaled to 128x64 and centre-cropped to its 96x64 bucket at left 16.
    meta = {"bucket": [96, 64], "original_size": [100, 200], "crop_top_left": [0, 16], "resized_size": [64, 128]}
    sample = {"pixels": pixels, "mask": mask, "meta": meta}
    apply(sample, Draw(flip=True))
    assert torch.equal(sample["pixels"], pixels.flip(-1)) and torch.equal(sample["mask"], mask.flip(-1))
    assert sample["meta"]["crop_top_left"] == [0, 128 - 96 - 16] and meta["crop_top_left"] == [0, 16]
    uneven = {"pixels": pixels, "meta": {**meta, "crop_top_left": [0, 5]}}
    apply(uneven, Draw(flip=True))
    assert uneven["meta"]["crop_top_left"] == [0, 27]  # measured from the other edge


def _hue_degrees(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


def test_hue_shift_turns_the_hue_by_the_drawn_amount_and_keeps_value() -> None:
    colours = [(200, 40, 40), (40, 180, 60), (40, 70, 220), (235, 210, 40)]
    pixels = torch.tensor(colours, dtype=torch.uint8).T.reshape(3, 1, 4)
    for shift in (-8.0, -3.3, 5.0, 8.0):  # OpenCV units: 2 degrees each
        shifted = shift_hue(pixels, shift)
        for i, colour in enumerate(colours):
            got = tuple(int(v) for v in shifted[:, 0, i])
            turned = (_hue_degrees(got) - _hue_degrees(colour) + 180) % 360 - 180
            assert abs(turned - 2 * shift) < 3.0, (colour, got, shift)  # PIL's 8-bit hue: 1.4-degree steps
            assert abs(max(got) - max(colour)) <= 2  # value kept


def test_kohya_gamma_is_numpy_power_clipped() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, 0)
    for gamma in (0.95, 1.0, 1.031, 1.05):
        expected = np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)  # kohya's AugHelper
        assert np.array_equal(kohya_gamma(torch.from_numpy(image), gamma).numpy(), expected)


def test_draws_have_kohyas_rates_and_ranges_and_depend_on_the_key_alone() -> None:
    both = Augment(flip=True, color=True)
    draws = [draw(both, Augment.rng(3, 1, f"k{i}"), (5, 9)) for i in range(4000)]
    assert abs(sum(d.flip for d in draws) / 4000 - 0.5) < 0.03
    coloured = [d for d in draws if d.hue_shift is not None or d.gamma is not None]
    assert abs(len(coloured) / 4000 - 0.33) < 0.03
    assert all(-8 <= d.hue_shift <= 8 for d in draws if d.hue_shift is not None)
    assert all(0.95 <= d.gamma <= 1.05 for d in draws if d.gamma is not None)
    assert {d.crop_top_left for d in draws} == {(t, left) for t in range(6) for left in range(10)}
    # The same key, seed and epoch draw the same; options that are off change no other option's draws.
    assert draw(both, Augment.rng(3, 1, "k7"), (5, 9)) == draws[7]
    flip_only = draw(Augment(flip=True), Augment.rng(3, 1, "k7"), (5, 9))
    assert (flip_only.flip, flip_only.crop_top_left) == (draws[7].flip, draws[7].crop_top_left)
    assert flip_only.hue_shift is None and flip_only.gamma is None
    assert draw(both, Augment.rng(3, 2, "k7"), (5, 9)) != draws[7] or draw(both, Augment.rng(3, 2, "k8"), (5, 9)) \
        != draws[8]


def test_bucket_no_upscale_keeps_small_images_and_shrinks_large_ones() -> None:
    spec = BucketSpec.for_base(512)
    small = no_upscale_placement(300, 200, spec)
    assert (small.bucket.width, small.bucket.height, small.resized) == (256, 192, (300, 200))
    assert small.crop_top_left == (4, 22)  # the remainder centre-cropped, nothing scaled
    for width, height in ((3000, 2000), (1000, 4000), (777, 777), (2049, 1025)):
        large = no_upscale_placement(width, height, spec)
        bucket = large.bucket
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert bucket.width * bucket.height <= spec.max_area
        assert large.resized[0] >= bucket.width and large.resized[1] >= bucket.height
        assert large.resized[0] <= width and large.resized[1] <= height
        assert abs(math.log(large.resized[0] / large.resized[1]) - math.log(width / height)) < 0.02
    image = SourceImage(Path("a.png"), "1_a/a.png", "1_a", "a", 1, None)
    assert image_options(image, PrepareOptions(no_upscale=True)) == {"no_upscale": True}
    assert image_options(image, PrepareOptions(no_upscale=True, buckets=False)) == {}  # as sd-scripts


def _rgba_folder(root: Path) -> Path:
    folder = root / "src" / "2_cube"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(((96, 64), (80, 80), (64, 112))):
        rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        rgba[:, : size[0] // 2, 3] = 0  # the left half transparent
        rgba[:, size[0] // 2:, 3] = 255
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("cube")
    return root / "src"


def test_alpha_mask_keeps_the_colour_and_places_the_mask_like_the_image(tmp_path: Path) -> None:
    src = _rgba_folder(tmp_path)
    prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, alpha_mask=True, bucket_step=16,
                                                          min_bucket_side=32, max_bucket_side=128))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["masks"] is True
    for key, members in shard_members(tmp_path / "out").items():
        meta = json.loads(members["json"])
        source = np.asarray(Image.open(src.parent / "src" / f"{key}.png"))
        size = tuple(reversed(meta["resized_size"]))
        top, left = meta["crop_top_left"]
        height, width = meta["target_size"]
        # Colour and alpha are resized apart (as kohya's cv2 resize does; PIL's RGBA resize would premultiply):
        # the colour of transparent pixels is kept, not composited on white, and the mask is the alpha.
        for channels, member in ((source[..., :3], "png"), (source[..., 3], "mask.png")):
            placed = np.asarray(Image.fromarray(channels).resize(size, Image.LANCZOS))
            assert np.array_equal(_array(members[member]), placed[top:top + height, left:left + width])


def test_mask_folder_red_channel_and_bad_masks(tmp_path: Path) -> None:
    src = _rgba_folder(tmp_path)
    masks = tmp_path / "masks" / "2_cube"
    masks.mkdir(parents=True)
    for i, size in enumerate(((96, 64), (80, 80), (64, 112))):
        red = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        red[: size[1] // 2, :, 0] = 255  # the top half counts
        red[..., 1] = 255  # green is ignored
        Image.fromarray(red).save(masks / f"{i}.jpg" if i == 2 else masks / f"{i}.png")
    prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, mask_dir=str(tmp_path / "masks"),
                                                          buckets=False))
    for members in shard_members(tmp_path / "out").values():
        mask = _array(members["mask.png"])
        assert mask.shape == (64, 64) and mask[:20].min() > 200 and mask[-20:].max() < 50
    Image.new("RGB", (10, 10)).save(masks / "1.png")
    with pytest.raises(DatasetFolderError,
                       match=r"--mask-dir: mask '.*1.png' is 10x10 but its image '.*1.png' is 80x80"):
        prepare_dataset(src, tmp_path / "out2", PrepareOptions(resolution=64, mask_dir=str(tmp_path / "masks")))
    (masks / "1.png").unlink()
    with pytest.raises(DatasetFolderError, match=r"--mask-dir '.*masks' has no mask for image '2_cube/1'"):
        prepare_dataset(src, tmp_path / "out2", PrepareOptions(resolution=64, mask_dir=str(tmp_path / "masks")))
    assert not (tmp_path / "out2").exists()


def test_random_crop_is_drawn_per_epoch_and_recorded(tmp_path: Path) -> None:
    src = _rgba_folder(tmp_path)
    prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, random_crop=True, alpha_mask=True,
                                                          buckets=False))
    stored = {key: (json.loads(m["json"]), _array(m["png"]), _array(m["mask.png"]))
              for key, m in shard_members(tmp_path / "out").items()}
    assert all(meta["uncropped"] and image.shape[:2] == tuple(meta["resized_size"])
               for meta, image, _ in stored.values())
    loader = ShardLoader(tmp_path / "out", rank=0, world_size=1, batch_size=1, seed=2, num_workers=1,
                         use_masks=True, augment=AugmentPolicy(Augment(flip=True)))
    offsets = set()
    for epoch in range(4):
        for batch in loader.epoch(epoch):
            meta, image, mask = stored[batch.keys[0].split("#")[0]]
            top, left = batch.metas[0]["crop_top_left"]
            if batch.metas[0]["flipped"]:  # the recorded crop is the mirrored image's
                left = meta["resized_size"][1] - 64 - left
            pixels, weights = image[top:top + 64, left:left + 64], mask[top:top + 64, left:left + 64]
            if batch.metas[0]["flipped"]:
                pixels, weights = pixels[:, ::-1], weights[:, ::-1]
            assert np.array_equal(batch.pixels[0].permute(1, 2, 0).numpy(), pixels)
            assert np.array_equal(batch.masks[0, 0].numpy(), weights)  # type: ignore[index]
            offsets.add((batch.keys[0], top, left))
    loader.close()
    assert len(offsets) > 6  # 2 repeats x 3 images, 4 epochs: the crops move


def test_a_half_zero_mask_gives_no_gradient_from_that_half() -> None:
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    masks = torch.full((2, 1, 64, 64), 255, dtype=torch.uint8)
    masks[..., :32] = 0  # the left half of the image: the left 4 latent columns
    loss = ((prediction - target).square() * mask_weights(masks, (8, 8))).mean()
    loss.backward()
    assert prediction.grad is not None
    assert torch.count_nonzero(prediction.grad[..., :4]) == 0
    assert torch.count_nonzero(prediction.grad[..., 4:]) == prediction.grad[..., 4:].numel()
    # Area resizing: a mask edge inside a latent cell weighs that cell by the fraction kept.
    masks[..., :36] = 0
    assert mask_weights(masks, (8, 8))[0, 0, 0, 4].item() == pytest.approx(0.5)
