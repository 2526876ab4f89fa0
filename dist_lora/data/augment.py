"""Image augmentation at load time, as kohya sd-scripts does it: flip_aug, color_aug and random_crop.

Every draw of a sample comes from a generator keyed by (seed, epoch, sample key), like its caption's,
so a sample is augmented the same way on any rank, in any worker, before or after a resume. All values
are always drawn, in a fixed order, so that turning one option on does not move another's draws.

- flip: mirror left-right with probability 0.5. SDXL's crop conditioning is mirrored with it (the crop's
  left edge measured from the other side), and a cached dataset holds the mirrored latents too.
- color: kohya's color_aug: with probability 0.33, either a hue shift of up to 8 of OpenCV's 180 hue
  units (16 degrees) or kohya's gamma (each 8-bit value v becomes v ** g, g in [0.95, 1.05], clipped).
- random crop: samples prepared with --random-crop are stored scaled to cover their bucket but
  uncropped; the crop's offset is drawn here and recorded for SDXL's crop conditioning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dist_lora.data.buckets import Bucket, place
from dist_lora.data.per_subset import PerSubset

HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units (180 per turn), as kohya
COLOR_PROBABILITY = 0.33


@dataclass(frozen=True)
class Augment:
    flip: bool = False  # kohya: flip_aug
    color: bool = False  # kohya: color_aug

    @property
    def active(self) -> bool:
        return self.flip or self.color

    @staticmethod
    def rng(seed: int, epoch: int, key: str) -> random.Random:
        return random.Random(f"augment/{seed}/{epoch}/{key}")


AugmentPolicy = PerSubset[Augment]


@dataclass(frozen=True)
class Draw:
    """What happens to one sample this epoch."""

    flip: bool = False
    crop_top_left: tuple[int, int] | None = None  # for a sample stored uncropped
    hue_shift: float | None = None  # OpenCV hue units
    gamma: float | None = None


def draw(augment: Augment, rng: random.Random, crop_room: tuple[int, int] | None = None) -> Draw:
    """The sample's draws; ``crop_room``: (rows, columns) to spare around the bucket, for an uncropped sample."""
    flip = rng.random() < 0.5
    top = rng.randint(0, crop_room[0]) if crop_room else 0
    left = rng.randint(0, crop_room[1]) if crop_room else 0
    colour = rng.random() <= COLOR_PROBABILITY
    hue_branch = rng.random() > 0.5
    hue = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
    gamma = rng.uniform(0.95, 1.05)
    coloured = augment.color and colour
    return Draw(augment.flip and flip, (top, left) if crop_room else None,
                hue if coloured and hue_branch else None, gamma if coloured and not hue_branch else None)


def shift_hue(pixels: torch.Tensor, shift: float) -> torch.Tensor:
    """uint8 RGB [3, H, W] with the hue turned by ``shift`` OpenCV units (180 per turn), saturation and value
    kept (PIL's 8-bit HSV: 256 hue steps per turn).

    kohya converts its RGB array as if it were BGR, whose hue circle is this one mirrored: its shift turns
    the other way. The shift is drawn symmetrically around 0, so the augmentation is the same."""
    rgb = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    hsv = np.array(rgb.convert("HSV"))
    steps = round(shift * 256 / 180)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + steps) % 256).astype(np.uint8)
    out = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def kohya_gamma(pixels: torch.Tensor, gamma: float) -> torch.Tensor:
    """kohya's colour gamma: ``clip(v ** gamma, 0, 255)`` of each 8-bit value, truncated to uint8."""
    return pixels.double().pow(gamma).clamp(0, 255).to(torch.uint8)


def resized_width(meta: dict[str, Any]) -> int:
    """Width of the scaled image the bucket was cropped from (older datasets: computed as prepare did)."""
    if "resized_size" in meta:
        return int(meta["resized_size"][1])
    height, width = meta["original_size"]
    bucket_w, bucket_h = meta["bucket"]
    return place(int(width), int(height), Bucket(int(bucket_w), int(bucket_h))).resized[0]


def apply(sample: dict[str, Any], how: Draw) -> None:
    """Crop, colour and flip ``sample``'s "pixels" (and "mask"; flips "latent_mean" / "latent_std" only by
    swapping in the cached mirror, which the caller does) in place; its meta's crop is updated."""
    meta = dict(sample["meta"])
    bucket_w, bucket_h = (int(v) for v in meta["bucket"])
    if how.crop_top_left is not None:
        top, left = how.crop_top_left
        for name in ("pixels", "mask"):
            if name in sample:
                sample[name] = sample[name][:, top:top + bucket_h, left:left + bucket_w].contiguous()
        meta["crop_top_left"] = [top, left]
    if "pixels" in sample:
        if how.hue_shift is not None:
            sample["pixels"] = shift_hue(sample["pixels"], how.hue_shift)
        if how.gamma is not None:
            sample["pixels"] = kohya_gamma(sample["pixels"], how.gamma)
    if how.flip:
        for name in ("pixels", "mask"):
            if name in sample:
                sample[name] = sample[name].flip(-1).contiguous()
        top, left = meta["crop_top_left"]
        meta["crop_top_left"] = [top, resized_width(meta) - bucket_w - left]
    meta["flipped"] = how.flip
    sample["meta"] = meta
