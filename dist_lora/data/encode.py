"""Encoding one source image for the shards: its bucket placement (or kohya's bucket_no_upscale), the
resize and crop (none for random cropping, done at load time), and its loss mask (its transparency or
a mask file's red channel) placed exactly as the image. Runs in `dist-lora prepare`'s worker processes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dist_lora.data.audit import perceptual_hash
from dist_lora.data.buckets import (
    Bucket,
    BucketError,
    BucketSpec,
    Placement,
    nearest_bucket,
    no_upscale_placement,
    place,
)
from dist_lora.data.images import RejectedImage, open_image
from dist_lora.data.stream import MASK_MEMBER


def resize_and_crop(image: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``image`` to cover ``bucket`` and centre-crop it; return the crop's (top, left)."""
    placement = place(image.width, image.height, bucket)
    resized = image.resize(placement.resized, Image.Resampling.LANCZOS)
    top, left = placement.crop_top_left
    return resized.crop((left, top, left + bucket.width, top + bucket.height)), (top, left)


@dataclass(frozen=True)
class EncodeJob:
    path: str
    min_side: int
    max_pixels: int
    buckets: list[Bucket]
    image_format: str
    options: dict[str, Any]  # random_crop, alpha_mask, mask (a mask file's path) and no_upscale: the image's own
    spec: BucketSpec | None = None  # for no_upscale
    data: bytes | None = None  # the image file's bytes (a WebDataset member); None: read ``path``


def _placement(image: Image.Image, job: EncodeJob) -> Placement:
    if job.options.get("no_upscale"):
        assert job.spec is not None
        try:
            return no_upscale_placement(image.width, image.height, job.spec)
        except BucketError as exc:
            raise RejectedImage(f"too small: {exc}") from exc
    return place(image.width, image.height, nearest_bucket(image.width, image.height, job.buckets))


def _fit(image: Image.Image, placement: Placement, crop: bool) -> Image.Image:
    """Scaled to the placement (and cropped to its bucket unless ``crop`` is false: random crop)."""
    if image.size != tuple(placement.resized):
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    if not crop:
        return image
    top, left = placement.crop_top_left
    return image.crop((left, top, left + placement.bucket.width, top + placement.bucket.height))


def _png_bytes(image: Image.Image, image_format: str = "png") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def encode_image(job: EncodeJob) -> tuple[dict[str, bytes], dict[str, Any]] | str:
    """Worker process: the encoded members (image, and mask) and their geometry, or why it was rejected."""
    options = job.options
    try:
        image = open_image(Path(job.path), min_side=job.min_side, max_pixels=job.max_pixels,
                           keep_alpha=bool(options.get("alpha_mask")), data=job.data)
        placement = _placement(image, job)
    except RejectedImage as exc:
        return str(exc)
    mask = None
    if options.get("alpha_mask"):
        # kohya trains on the stored colour of transparent pixels and weighs their loss by the alpha.
        mask = image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
        image = image.convert("RGB")
    elif options.get("mask"):
        with Image.open(options["mask"]) as opened:
            mask = ImageOps.exif_transpose(opened).convert("RGB").getchannel("R")  # the red channel, as kohya
    crop = not options.get("random_crop")
    members = {job.image_format: _png_bytes(_fit(image, placement, crop), job.image_format)}
    phash = perceptual_hash(image.convert("RGB"))  # for the dataset audit, while the image is decoded
    if mask is not None:
        members[MASK_MEMBER] = _png_bytes(_fit(mask, placement, crop))
    bucket = placement.bucket
    geometry = {"original_size": [image.height, image.width], "crop_top_left": list(placement.crop_top_left),
                "target_size": [bucket.height, bucket.width], "bucket": [bucket.width, bucket.height],
                "resized_size": [placement.resized[1], placement.resized[0]],
                **({"uncropped": True} if not crop else {}), "phash": phash}
    return members, geometry
