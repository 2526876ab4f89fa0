"""The images `dist-lora prepare` encodes: a kohya folder's, a dataset config's subsets', and (in
webdataset_source.py) existing shards' samples; each with its split (train / val), its sample key and
the options it is encoded with."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dist_lora.data.dataset_config import DatasetSpec
from dist_lora.data.finetune_metadata import scan_metadata_subset
from dist_lora.data.kohya import (
    IMAGE_EXTENSIONS,
    DatasetFolderError,
    SourceImage,
    check_mask_sizes,
    scan_images,
    scan_subset,
    with_masks,
)
from dist_lora.data.prepare_options import PrepareOptions
from dist_lora.data.shard_writer import sample_key


@dataclass(frozen=True)
class PlannedSample:
    """A source image with its place in the output."""

    image: SourceImage
    split: str  # "train" or "val" (regularization images always train)
    key: str  # its sample key in the split's shards
    rejected: str = ""  # why it cannot be used, known before decoding (a shard sample without an image)
    warning: str = ""  # about its caption, known before reading it (a shard sample without one)


def scan_sources(src: Path | None, opts: PrepareOptions, dataset: DatasetSpec | None) -> list[SourceImage]:
    if dataset is not None:
        if opts.reg_src:
            raise DatasetFolderError(f"--reg '{opts.reg_src}' and a dataset config: give the regularization images "
                                     f"as a subset with is_reg = true in '{dataset.path}' instead.")
        if opts.mask_dir:
            raise DatasetFolderError(f"--mask-dir '{opts.mask_dir}' is laid out as a kohya folder; with "
                                     f"'{dataset.path}' give each image-folder subset its masks as "
                                     f"conditioning_data_dir instead.")
        images = []
        for i, subset in enumerate(dataset.subsets):
            found = scan_metadata_subset(subset, i, opts.wildcard) if subset.metadata_file is not None else \
                scan_subset(subset, i, opts.caption_extension, opts.wildcard)
            check_mask_sizes(found, f"{subset.where}.conditioning_data_dir")
            images += found
        return images
    images = []
    if src is not None:  # None: the training images come from WebDataset shards, only --reg is a folder
        # scan_images raises DatasetFolderError for a missing folder or one without concepts.
        images = [replace(image, caption_lines=opts.wildcard) for image in scan_images(src)]
        if not images:
            raise DatasetFolderError(f"dataset folder '{src}' has concept folders but no images "
                                     f"({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if opts.reg_src:
        reg = [replace(image, caption_lines=opts.wildcard) for image in scan_images(Path(opts.reg_src), is_reg=True)]
        if not reg:
            raise DatasetFolderError(f"regularization folder '{opts.reg_src}' has concept folders but no images.")
        images += reg
    if opts.mask_dir:
        images = with_masks(images, Path(opts.mask_dir), "--mask-dir")
        check_mask_sizes(images, "--mask-dir")
    return images


def split_validation(images: list[SourceImage], fraction: float) -> tuple[list[SourceImage], list[SourceImage]]:
    """Training and held-out images: an image is held out by a hash of its path, so the split does not
    change when images are added or removed. Regularization images always train."""
    if fraction <= 0:
        return images, []
    held = [i for i in images if not i.is_reg and held_out(i.relative, fraction)]
    if not held:  # a small set: hold out at least one image
        candidates = [i for i in images if not i.is_reg]
        held = [min(candidates, key=lambda i: zlib.crc32(i.relative.encode("utf-8")))] if len(candidates) > 1 else []
    kept = [i for i in images if i not in held]
    return kept, held


def held_out(relative: str, fraction: float) -> bool:
    """Whether the image at ``relative`` is held out for validation: by a hash of its path, so the split does
    not change when images are added or removed."""
    return zlib.crc32(relative.encode("utf-8")) % 10_000 < fraction * 10_000


def planned_samples(images: list[SourceImage], val_fraction: float) -> list[PlannedSample]:
    """``images`` split into training and held-out images (these once each), with keys unique per split."""
    train, val = split_validation(images, val_fraction)
    planned = []
    for split, group in (("train", train), ("val", [replace(i, repeats=1) for i in val])):
        used: set[str] = set()
        planned += [PlannedSample(image, split, sample_key(image.relative, used)) for image in group]
    return planned


def image_options(image: SourceImage, opts: PrepareOptions) -> dict[str, Any]:
    """How this image is encoded beyond the folder's bucket set: its subset's options, else the command
    line's (and its own bucket set where its dataset has one)."""
    own = opts.for_image(image)
    options_of_set = {"buckets": asdict(own.bucket_spec())} if own is not opts else {}
    opts = own
    random_crop = opts.random_crop if image.random_crop is None else image.random_crop
    alpha_mask = opts.alpha_mask if image.alpha_mask is None else image.alpha_mask
    options: dict[str, Any] = {"random_crop": True} if random_crop else {}
    if alpha_mask:
        options["alpha_mask"] = True
    elif image.mask_path is not None:
        options["mask"] = str(image.mask_path)
    if opts.no_upscale and opts.buckets:  # without buckets sd-scripts ignores bucket_no_upscale too
        options["no_upscale"] = True
    return {**options, **options_of_set}
