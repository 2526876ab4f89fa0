"""Aspect-ratio buckets: the set of training shapes and the resize + crop that maps an image onto one.

As in kohya sd-scripts, a bucket set holds, for every width from ``min_side`` to ``max_side`` in
``step`` increments, the tallest height (also a multiple of ``step``, within the side limits) whose area
does not exceed ``max_area``, plus the transposed shapes. An image goes to the bucket whose aspect ratio
is nearest in log space; it is scaled to cover the bucket and centre-cropped, and the crop is recorded
for SDXL's micro-conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_lora.errors import DistLoraError


class BucketError(DistLoraError):
    """Bucket parameters that cannot form a bucket set; the message names the parameter."""


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BucketSpec:
    resolution: int  # base side: the buckets' area is at most resolution**2 unless max_area says otherwise
    min_side: int
    max_side: int
    max_area: int
    step: int = 64

    @classmethod
    def for_base(cls, resolution: int, *, min_side: int = 0, max_side: int = 0, max_area: int = 0,
                 step: int = 64) -> BucketSpec:
        """Defaults as kohya's: sides from resolution/2 to resolution*2, area up to resolution**2."""
        spec = cls(resolution, min_side or max(step, resolution // 2), max_side or resolution * 2,
                   max_area or resolution * resolution, step)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.step < 8 or self.step % 8:
            raise BucketError(f"bucket step {self.step} must be a positive multiple of 8 (64 is usual).")
        for name in ("resolution", "min_side", "max_side"):
            value = getattr(self, name)
            if value < self.step or value % self.step:
                raise BucketError(f"bucket {name} {value} must be a multiple of the step {self.step} (and >= it).")
        if self.min_side > self.max_side:
            raise BucketError(f"bucket min_side {self.min_side} is larger than max_side {self.max_side}.")
        if self.max_area < self.min_side * self.min_side:
            raise BucketError(f"bucket max_area {self.max_area} is below min_side^2 = {self.min_side ** 2}: no bucket "
                              f"would fit; raise max_area or lower min_side.")


SD1_BUCKETS = BucketSpec.for_base(512)  # 256..1024 sides, <= 512^2 pixels
SDXL_BUCKETS = BucketSpec.for_base(1024)  # 512..2048 sides, <= 1024^2 pixels


def bucket_set(spec: BucketSpec) -> list[Bucket]:
    """Every bucket of ``spec``, sorted by aspect ratio (widest last)."""
    found: set[Bucket] = set()
    for width in range(spec.min_side, spec.max_side + 1, spec.step):
        height = min(spec.max_side, spec.max_area // width // spec.step * spec.step)
        if height >= spec.min_side:
            found.add(Bucket(width, height))
            found.add(Bucket(height, width))
    return sorted(found, key=lambda b: (b.aspect, b.width))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to width/height (in log space); larger area breaks ties."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


@dataclass(frozen=True)
class Placement:
    """How an image of ``original`` size becomes a ``bucket`` image: scale to ``resized``, crop at ``crop``."""

    bucket: Bucket
    original: tuple[int, int]  # (width, height)
    resized: tuple[int, int]  # (width, height) after scaling, before the crop
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def place(width: int, height: int, bucket: Bucket) -> Placement:
    """Scale so the image covers the bucket (no padding), then centre-crop the excess."""
    scale = max(bucket.width / width, bucket.height / height)
    resized_w = max(bucket.width, round(width * scale))
    resized_h = max(bucket.height, round(height * scale))
    top, left = (resized_h - bucket.height) // 2, (resized_w - bucket.width) // 2
    return Placement(bucket, (width, height), (resized_w, resized_h), (top, left))


def no_upscale_placement(width: int, height: int, spec: BucketSpec) -> Placement:
    """kohya's bucket_no_upscale: an image within ``spec.max_area`` keeps its size and its bucket is that size
    rounded down to the step (the remainder centre-cropped); a larger one is scaled down to about max_area,
    keeping its aspect ratio, first. The bucket set is then whatever the images make it."""
    aspect = width / height
    if width * height > spec.max_area:
        def down(x: float) -> int:
            whole = int(x + 0.5)
            return whole - whole % spec.step
        scaled_w = math.sqrt(spec.max_area * aspect)
        by_width = down(scaled_w)
        by_height = down(spec.max_area / scaled_w)
        width_error = abs(by_width / max(1, down(by_width / aspect)) - aspect)
        height_error = abs(down(by_height * aspect) / max(1, by_height) - aspect)
        resized = ((by_width, int(by_width / aspect + 0.5)) if width_error < height_error
                   else (int(by_height * aspect + 0.5), by_height))
    else:
        resized = (width, height)
    bucket = Bucket(resized[0] - resized[0] % spec.step, resized[1] - resized[1] % spec.step)
    if bucket.width < spec.step or bucket.height < spec.step:
        raise BucketError(f"a {width}x{height} image is smaller than one bucket step ({spec.step}) on a side")
    top, left = (resized[1] - bucket.height) // 2, (resized[0] - bucket.width) // 2
    return Placement(bucket, (width, height), resized, (top, left))
