"""`dist-lora prepare`: a kohya-style folder, the subsets of an sd-scripts dataset config, or existing
WebDataset shards -> bucketed WebDataset tar shards + manifest.json + report.json.

Each sample holds the image resized and cropped to its aspect-ratio bucket, its caption and a JSON
record with what SDXL micro-conditioning needs (original size, crop top-left, target size), the kohya
repeat count, whether it is a regularization image, and its source. Every shard holds one bucket, so
the loader can form single-shape batches and plan them from the manifest alone.

Images are decoded in parallel worker processes, and under a launcher (``accelerate launch``, ``srun``)
each process prepares its slice (every n-th image, or every n-th source shard); the main process merges
them. A re-run into an existing output reuses the encoded image of every source that is unchanged (a
file's size and modification time, a shard member's size and checksum; captions are always re-read).
The output folder is assembled beside its final location and renamed into place, so an interrupted
run never leaves a half-written dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from dist_lora.data.audit import load_tokenizer
from dist_lora.data.dataset_config import DatasetSpec
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.prepare_encode import prepare_share
from dist_lora.data.prepare_merge import REPORT_NAME, merge_shares
from dist_lora.data.prepare_options import PrepareOptions, PrepareReport
from dist_lora.data.prepare_ranks import Ranks, check_shared
from dist_lora.data.prepare_sources import PlannedSample, planned_samples, scan_sources
from dist_lora.data.shard_writer import SOURCES_NAME
from dist_lora.data.webdataset_source import WebDatasetSource
from dist_lora.utils.files import check_writable_dir

__all__ = ["REPORT_NAME", "PrepareOptions", "PrepareReport", "prepare_dataset"]


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path '{out}' exists and is not a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / SOURCES_NAME).is_file():
        raise FileExistsError(f"output folder '{out}' is not empty and was not written by `dist-lora prepare`; "
                              f"choose another folder or pass --overwrite.")
    check_writable_dir(out)


def _check_options(opts: PrepareOptions) -> None:
    if opts.image_format not in ("png", "jpg"):
        raise DatasetFolderError(f"image format {opts.image_format!r} is not supported; use 'png' or 'jpg'.")
    if opts.shard_size < 1:
        raise DatasetFolderError(f"shard size {opts.shard_size} must be at least 1.")
    if opts.resolution < 64 or opts.resolution % 64:
        raise DatasetFolderError(f"resolution {opts.resolution} must be a multiple of 64 (and >= 64).")
    for own in [opts, *(replace(opts, **b) for b in opts.subset_buckets if b)]:
        own.bucket_spec()  # raises BucketError naming a bad bucket parameter
    if not 0.0 <= opts.val_fraction < 1.0:
        raise DatasetFolderError(f"validation fraction {opts.val_fraction} must be at least 0 and below 1.")


def _check_webdataset(src: str | Path | None, opts: PrepareOptions, dataset: DatasetSpec | None) -> None:
    if src is not None or dataset is not None:
        raise DatasetFolderError(f"--webdataset and {'a dataset config' if dataset is not None else f'{src!r}'}: "
                                 f"give one source of training images (add the shards' images as a folder, or "
                                 f"prepare them separately).")
    if opts.mask_dir:
        raise DatasetFolderError(f"--mask-dir '{opts.mask_dir}' mirrors a kohya folder; shard samples have no "
                                 f"mask files (use --alpha-mask for images with transparency).")


def prepare_dataset(src: str | Path | None, out: str | Path, opts: PrepareOptions | None = None,
                    dataset: DatasetSpec | None = None, webdataset: WebDatasetSource | None = None) -> PrepareReport:
    """``src``: a kohya training folder; or None with ``dataset``, a dataset config's subsets, whose bucket
    settings replace those of ``opts``; or None with ``webdataset``, existing shards. Under a launcher,
    call on every process: each prepares its slice and every process returns the merged report."""
    opts = opts or PrepareOptions()
    if dataset is not None:
        opts = replace(opts, **dataset.prepare, subset_buckets=tuple(s.buckets for s in dataset.subsets))
    if webdataset is not None:
        _check_webdataset(src, opts, dataset)
    elif src is None and dataset is None:
        raise DatasetFolderError("give a dataset folder, a dataset config (--dataset-config) or --webdataset shards.")
    folder = Path(src) if src is not None else dataset.path if dataset is not None else None
    source = webdataset.pattern if webdataset is not None else str(folder)
    out = Path(out)
    _check_options(opts)
    images = scan_sources(folder, opts, dataset)  # only --reg images with --webdataset
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None  # checked before any encoding
    _check_output(out, opts.overwrite)
    planned = planned_samples(images, opts.val_fraction)
    prefixes = webdataset.prefixes({i.folder for i in images}) if webdataset is not None else []

    ranks = Ranks.current()
    started = time.perf_counter()
    staging = Path(ranks.from_main(lambda: _new_staging(out)))
    shares = [staging / f"rank-{rank:05d}" for rank in range(ranks.size)]

    def my_items() -> Iterator[PlannedSample]:
        yield from (planned[i] for i in ranks.mine(len(planned)))
        if webdataset is not None:
            yield from webdataset.samples(ranks.mine(len(webdataset.urls)), prefixes, opts.val_fraction)

    def my_share() -> None:
        check_shared(staging, ranks)
        prepare_share(my_items(), shares[ranks.rank], out, opts)

    def merge() -> PrepareReport:
        subsets = [s.record() for s in dataset.subsets] if dataset is not None else []
        report = merge_shares(staging, shares, opts, source=source, started=started, subsets=subsets,
                              tokenizer=tokenizer)
        _swap_into_place(staging, out)
        return report

    try:
        ranks.everywhere(my_share)
        return ranks.from_main(merge)
    finally:
        if ranks.is_main and staging.exists():
            shutil.rmtree(staging)


def _new_staging(out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``; the old folder is moved aside first and removed only afterwards."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
