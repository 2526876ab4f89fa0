"""`dist-lora prepare`: a kohya-style folder, or the subsets of an sd-scripts dataset config, -> bucketed
WebDataset tar shards + manifest.json + report.json.

Each sample holds the image resized and cropped to its aspect-ratio bucket, its caption and a JSON
record with what SDXL micro-conditioning needs (original size, crop top-left, target size), the kohya
repeat count, whether it is a regularization image, and its source. Every shard holds one bucket, so
the loader can form single-shape batches and plan them from the manifest alone.

Images are decoded in parallel worker processes. A re-run into an existing output reuses the encoded
image of every source whose size and modification time are unchanged (captions are always re-read).
The output folder is assembled beside its final location and renamed into place, so an interrupted
run never leaves a half-written dataset.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dist_lora.data.audit import DEFAULT_HASH_DISTANCE, AuditItem, AuditReport, audit, file_hash, load_tokenizer
from dist_lora.data.buckets import (
    Bucket,
    BucketSpec,
    bucket_set,
)
from dist_lora.data.dataset_config import DatasetSpec
from dist_lora.data.encode import EncodeJob, encode_image
from dist_lora.data.finetune_metadata import scan_metadata_subset
from dist_lora.data.images import DEFAULT_MAX_PIXELS
from dist_lora.data.kohya import (
    IMAGE_EXTENSIONS,
    DatasetFolderError,
    SourceImage,
    check_mask_sizes,
    read_caption,
    scan_images,
    scan_subset,
    with_masks,
)
from dist_lora.data.manifest import new_manifest, shard_entry, write_manifest
from dist_lora.data.stream import MASK_MEMBER
from dist_lora.utils.files import check_writable_dir

REPORT_NAME = "report.json"
SOURCES_NAME = "sources.json"  # what each sample was made from; lets a re-run reuse unchanged images
PARALLEL_THRESHOLD = 32  # fewer images than this are decoded in-process (starting workers costs ~1 s)


@dataclass
class PrepareOptions:
    resolution: int = 512  # bucket base side (SD 1.x: 512, SDXL: 1024), or the square side without buckets
    trigger: str = ""
    shard_size: int = 1000  # samples per shard at most
    image_format: str = "png"
    overwrite: bool = False
    buckets: bool = True
    min_bucket_side: int = 0  # 0: resolution / 2
    max_bucket_side: int = 0  # 0: resolution * 2
    max_bucket_area: int = 0  # 0: resolution ** 2
    bucket_step: int = 64
    min_side: int = 0  # images whose shorter side is below this are rejected; 0: resolution / 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    reg_src: str = ""  # kohya regularization folder (prior preservation), same <repeats>_<class> layout
    workers: int = 0  # decode processes; 0: one per core
    val_fraction: float = 0.0  # images held out for validation loss, written to <out>/val (repeats 1)
    no_upscale: bool = False  # kohya's bucket_no_upscale: buckets from each image's own size, never enlarged
    random_crop: bool = False  # store images uncropped; the loader crops them at a drawn offset each epoch
    alpha_mask: bool = False  # keep each image's transparency as its loss mask (kohya's alpha_mask)
    mask_dir: str = ""  # mask images (their red channel) for masked loss, mirroring the source folder's layout
    caption_extension: str = ".caption"  # of a dataset config's subsets that set none (sd-scripts' default)
    wildcard: bool = False  # captions keep every line: one is chosen (and {a|b} expanded) per epoch
    audit_distance: int = DEFAULT_HASH_DISTANCE  # perceptual-hash bits within which images are near-duplicates
    tokenizer: str = ""  # a CLIP tokenizer (or diffusers) folder: the audit then counts caption tokens
    max_token_length: int = 75  # what the text encoder reads (kohya's max_token_length: 75, 150, 225)
    # A dataset config's subsets whose datasets set their own resolution / bucket settings (one dict of
    # these fields per subset, empty where none): several bucket sets in one prepared folder.
    subset_buckets: tuple[dict[str, Any], ...] = ()

    def for_image(self, image: SourceImage) -> PrepareOptions:
        """The options ``image`` is encoded with: its subset's bucket settings over these."""
        if image.subset is None or image.subset >= len(self.subset_buckets) or not self.subset_buckets[image.subset]:
            return self
        return replace(self, **self.subset_buckets[image.subset], subset_buckets=())

    def resolutions(self) -> list[int]:
        """The base sides the images are bucketed at."""
        return sorted({b.get("resolution", self.resolution) for b in self.subset_buckets} or {self.resolution})

    def bucket_spec(self) -> BucketSpec:
        if not self.buckets:
            return BucketSpec(self.resolution, self.resolution, self.resolution, self.resolution ** 2,
                              self.bucket_step)
        return BucketSpec.for_base(self.resolution, min_side=self.min_bucket_side, max_side=self.max_bucket_side,
                                   max_area=self.max_bucket_area, step=self.bucket_step)

    def encoding_fingerprint(self) -> dict[str, Any]:
        """What changes every encoded image; a re-run reuses images only when this is unchanged (and each
        image's own options, recorded with it)."""
        return {"buckets": asdict(self.bucket_spec()), "image_format": self.image_format,
                **({"no_upscale": True} if self.no_upscale and self.buckets else {})}

    @property
    def effective_min_side(self) -> int:
        return self.min_side or max(1, self.resolution // 4)


@dataclass
class PrepareReport:
    found: int = 0
    accepted: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    shards: int = 0
    samples_with_repeats: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    validation: PrepareReport | None = None  # the held-out set's own report (--val-fraction)
    audit: AuditReport | None = None  # training, validation and regularization images together

    def to_json(self) -> dict[str, Any]:
        return {"found": self.found, "accepted": self.accepted, "rejected_count": len(self.rejected),
                "encoded": self.encoded, "reused": self.reused, "shards": self.shards,
                "samples_with_repeats": self.samples_with_repeats, "buckets": self.buckets,
                "rejected": self.rejected, "warnings": self.warnings, "seconds": round(self.seconds, 3),
                **({"validation": self.validation.to_json()} if self.validation else {}),
                **({"audit": self.audit.to_json()} if self.audit else {})}

    def summary(self) -> str:
        reasons = Counter(r["reason"].split(":")[0] for r in self.rejected)
        lines = [f"found {self.found} images: {self.accepted} accepted, {len(self.rejected)} rejected "
                 f"({self.encoded} encoded, {self.reused} reused unchanged); {self.shards} shards in "
                 f"{len(self.buckets)} buckets, {self.samples_with_repeats} samples per epoch with repeats "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  rejected {n} x {reason}" for reason, n in sorted(reasons.items())]
        lines += [f"  rejected {r['path']}: {r['reason']}" for r in self.rejected]
        lines += [f"  warning {w['path']}: {w['warning']}" for w in self.warnings]
        if self.validation is not None:
            lines.append(f"held out for validation (in val/): {self.validation.accepted} images in "
                         f"{self.validation.shards} shards")
        if self.audit is not None:
            lines += self.audit.summary()
        return "\n".join(lines)


def _sample_key(relative: str, used: set[str]) -> str:
    # WebDataset splits a member name at its first dot, so keys carry none.
    base = relative.rsplit(".", 1)[0].replace(".", "_")
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical inputs give byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _BucketShardSink:
    """Writes samples into ``train-%06d.tar`` files of at most ``shard_size`` samples, one bucket per shard."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []
        self._open: dict[tuple[int, int], tuple[tarfile.TarFile, dict[str, Any]]] = {}

    def add(self, key: str, members: dict[str, bytes], bucket: tuple[int, int], repeats: int, is_reg: bool) -> str:
        current = self._open.get(bucket)
        if current is None or current[1]["samples"] >= self.shard_size:
            if current is not None:
                current[0].close()
            entry = shard_entry(f"train-{len(self.shards):06d}.tar", bucket)
            tar = tarfile.open(self.folder / entry["file"], "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self.shards.append(entry)
            current = self._open[bucket] = (tar, entry)
        tar, entry = current
        for ext, data in members.items():
            _add_member(tar, f"{key}.{ext}", data)
        entry["samples"] += 1
        entry["samples_with_repeats"] += repeats
        entry["reg_samples"] += int(is_reg)
        return str(entry["file"])

    def close(self) -> None:
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()


class _PreviousOutput:
    """Encoded images of an earlier run into the same output folder, reusable when the source is unchanged."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.sources: dict[str, dict[str, Any]] = {}
        self._tars: dict[str, tarfile.TarFile] = {}
        path = out / SOURCES_NAME
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return  # unreadable: encode everything again
        if data.get("fingerprint") == fingerprint:
            self.sources = data.get("sources", {})

    def lookup(self, image: SourceImage, options: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]] | None:
        entry = self.sources.get(image.relative)
        stat = image.path.stat()
        if entry is None or entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns \
                or entry.get("options", {}) != options or "mask" in options:  # a mask file may have changed
            return None
        try:
            tar = self._tars.get(entry["shard"])
            if tar is None:
                tar = self._tars[entry["shard"]] = tarfile.open(self.out / entry["shard"])  # noqa: SIM115
            members = {}
            for ext in entry.get("members", [entry["ext"]]):
                member = tar.extractfile(f"{entry['key']}.{ext}")
                if member is None:
                    return None
                members[ext] = member.read()
            return members, entry["geometry"]
        except (OSError, KeyError, tarfile.TarError):
            return None

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path '{out}' exists and is not a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / SOURCES_NAME).is_file():
        raise FileExistsError(f"output folder '{out}' is not empty and was not written by `dist-lora prepare`; "
                              f"choose another folder or pass --overwrite.")
    check_writable_dir(out)


def scan_sources(src: Path, opts: PrepareOptions, dataset: DatasetSpec | None) -> list[SourceImage]:
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


def _encoded_images(todo: list[tuple[int, EncodeJob]], workers: int) -> Iterator[tuple[int, Any]]:
    if workers <= 1 or len(todo) < PARALLEL_THRESHOLD:
        for index, job in todo:
            yield index, encode_image(job)
        return
    # Spawned (not forked) workers: the caller may hold threads (torch, tokenizers) that fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
        chunk = max(1, min(32, len(todo) // (workers * 4)))
        yield from zip((i for i, _ in todo), pool.map(encode_image, [j for _, j in todo], chunksize=chunk),
                       strict=True)


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


def _results_in_order(images: list[SourceImage], previous: _PreviousOutput, opts: PrepareOptions,
                      report: PrepareReport) -> Iterable[tuple[SourceImage, Any]]:
    bucket_sets: dict[BucketSpec, list[Bucket]] = {}
    reused: dict[int, Any] = {}
    todo: list[tuple[int, EncodeJob]] = []
    for index, image in enumerate(images):
        options = image_options(image, opts)
        hit = previous.lookup(image, options)
        if hit is not None:
            reused[index] = hit
            continue
        own = opts.for_image(image)
        spec = own.bucket_spec()
        buckets = bucket_sets.setdefault(spec, bucket_set(spec))
        todo.append((index, EncodeJob(str(image.path), own.effective_min_side, opts.max_pixels, buckets,
                                       opts.image_format, options, spec)))
    report.reused, report.encoded = len(reused), len(todo)
    workers = opts.workers or os.cpu_count() or 1
    encoded = _encoded_images(todo, workers)
    for index, image in enumerate(images):
        if index in reused:
            yield image, reused[index]
        else:
            got_index, result = next(encoded)
            assert got_index == index
            yield image, result


def prepare_dataset(src: str | Path | None, out: str | Path, opts: PrepareOptions | None = None,
                    dataset: DatasetSpec | None = None) -> PrepareReport:
    """``src``: a kohya training folder; or None with ``dataset``, a dataset config's subsets, whose bucket
    settings replace those of ``opts``."""
    opts = opts or PrepareOptions()
    if dataset is not None:
        opts = replace(opts, **dataset.prepare, subset_buckets=tuple(s.buckets for s in dataset.subsets))
    elif src is None:
        raise DatasetFolderError("give a dataset folder or a dataset config (--dataset-config).")
    src = Path(src) if src is not None else dataset.path if dataset is not None else Path()
    out = Path(out)
    if opts.image_format not in ("png", "jpg"):
        raise DatasetFolderError(f"image format {opts.image_format!r} is not supported; use 'png' or 'jpg'.")
    if opts.shard_size < 1:
        raise DatasetFolderError(f"shard size {opts.shard_size} must be at least 1.")
    if opts.resolution < 64 or opts.resolution % 64:
        raise DatasetFolderError(f"resolution {opts.resolution} must be a multiple of 64 (and >= 64).")
    for own in [opts, *(replace(opts, **b) for b in opts.subset_buckets if b)]:
        own.bucket_spec()  # raises BucketError naming a bad bucket parameter
    images = scan_sources(src, opts, dataset)
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None  # checked before any encoding
    _check_output(out, opts.overwrite)

    if not 0.0 <= opts.val_fraction < 1.0:
        raise DatasetFolderError(f"validation fraction {opts.val_fraction} must be at least 0 and below 1.")
    train_images, val_images = split_validation(images, opts.val_fraction)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        subsets = [s.record() for s in dataset.subsets] if dataset is not None else []
        audited: list[AuditItem] = []
        report = _write_folder(src, train_images, staging, out, opts, started, subsets, audited)
        if val_images:
            report.validation = _write_folder(src, [replace(i, repeats=1) for i in val_images], staging / "val",
                                              out / "val", opts, started, subsets, audited, "val")
        report.audit = audit(audited, trigger=opts.trigger, max_distance=opts.audit_distance, tokenizer=tokenizer,
                             max_tokens=opts.max_token_length)
        (staging / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False),
                                           encoding="utf-8")
        _swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def split_validation(images: list[SourceImage], fraction: float) -> tuple[list[SourceImage], list[SourceImage]]:
    """Training and held-out images: an image is held out by a hash of its path, so the split does not
    change when images are added or removed. Regularization images always train."""
    if fraction <= 0:
        return images, []
    held = [i for i in images if not i.is_reg and zlib.crc32(i.relative.encode("utf-8")) % 10_000 < fraction * 10_000]
    if not held:  # a small set: hold out at least one image
        candidates = [i for i in images if not i.is_reg]
        held = [min(candidates, key=lambda i: zlib.crc32(i.relative.encode("utf-8")))] if len(candidates) > 1 else []
    kept = [i for i in images if i not in held]
    return kept, held


def _write_folder(src: Path, images: list[SourceImage], staging: Path, out: Path, opts: PrepareOptions,
                  started: float, subsets: list[dict[str, Any]], audited: list[AuditItem],
                  split: str = "train") -> PrepareReport:
    """Encode ``images`` into shards and metadata in ``staging`` (reusing unchanged ones from ``out``)."""
    staging.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(found=len(images))
    fingerprint = opts.encoding_fingerprint()
    previous = _PreviousOutput(out, fingerprint)
    tag_frequency: dict[str, Counter[str]] = {}
    sources: dict[str, dict[str, Any]] = {}
    try:
        sink = _BucketShardSink(staging, opts.shard_size)
        used_keys: set[str] = set()
        for image, result in _results_in_order(images, previous, opts, report):
            if isinstance(result, str):
                report.rejected.append({"path": image.relative, "reason": result})
                continue
            members, geometry = result
            caption, warning = read_caption(image, opts.trigger)
            if warning:
                report.warnings.append({"path": image.relative, "warning": warning})
            key = _sample_key(image.relative, used_keys)
            raw_caption = read_caption(image, "")[0] if opts.trigger else caption
            audited.append(AuditItem(image.relative, "reg" if image.is_reg else split,
                                     geometry.get("phash") or file_hash(image.path), raw_caption))
            placement = {k: v for k, v in geometry.items() if k != "phash"}  # the hash stays in sources.json
            meta = {**placement, "repeats": image.repeats, "folder": image.folder, "source": image.relative,
                    "is_reg": image.is_reg, **({"subset": image.subset} if image.subset is not None else {})}
            encoded = list(members)
            members = {**members, "txt": caption.encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
            shard = sink.add(key, members, tuple(geometry["bucket"]), image.repeats, image.is_reg)
            stat = image.path.stat()
            sources[image.relative] = {"shard": shard, "key": key, "ext": opts.image_format, "members": encoded,
                                       "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "geometry": geometry,
                                       "options": image_options(image, opts)}
            report.accepted += 1
            tags = [t.strip() for t in caption.replace("\n", ",").split(",") if t.strip()]  # every wildcard line
            tag_frequency.setdefault(image.folder, Counter()).update(tags)
        sink.close()
        assert report.found == report.accepted + len(report.rejected)
        if report.accepted == 0:
            raise DatasetFolderError(f"'{src}': no image could be used; see the reasons: "
                                     f"{report.rejected[:3]}")
        _write_metadata(staging, opts, sink.shards, tag_frequency, sources, fingerprint, report, started, subsets)
    finally:
        previous.close()
    return report


def _write_metadata(staging: Path, opts: PrepareOptions, shards: list[dict[str, Any]],
                    tag_frequency: dict[str, Counter[str]], sources: dict[str, dict[str, Any]],
                    fingerprint: dict[str, Any], report: PrepareReport, started: float,
                    subsets: list[dict[str, Any]]) -> None:
    resolutions = opts.resolutions()
    manifest = new_manifest(resolution=max(resolutions), bucket_spec=fingerprint["buckets"],
                            image_format=opts.image_format, trigger=opts.trigger, num_samples=report.accepted,
                            shards=shards, tag_frequency={k: dict(v) for k, v in tag_frequency.items()},
                            subsets=subsets, masks=any(MASK_MEMBER in e["members"] for e in sources.values()),
                            uncropped=sum(bool(e["geometry"].get("uncropped")) for e in sources.values()),
                            wildcard=opts.wildcard)
    if len(resolutions) > 1:  # several bucket sets; samples and shards carry their own buckets
        manifest["resolutions"] = resolutions
    report.shards = len(shards)
    report.samples_with_repeats = manifest["num_samples_with_repeats"]
    report.buckets = {name: c["samples"] for name, c in manifest["buckets"].items()}
    report.seconds = time.perf_counter() - started
    write_manifest(staging, manifest)
    (staging / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    (staging / SOURCES_NAME).write_text(json.dumps({"fingerprint": fingerprint, "sources": sources},
                                                   ensure_ascii=False), encoding="utf-8")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``; the old folder is moved aside first and removed only afterwards."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
