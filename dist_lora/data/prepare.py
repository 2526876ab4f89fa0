"""`dist-lora prepare`: a kohya-style folder -> WebDataset tar shards + manifest.json + report.json.

Each sample holds the resized/cropped image, its caption and a JSON record with what SDXL
micro-conditioning needs (original size, crop top-left, target size), the kohya repeat count
and the source path. The output folder is assembled beside its final location and renamed into
place, so an interrupted run never leaves a half-written dataset.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dist_lora.data.kohya import DatasetFolderError, SourceImage, read_caption, scan_images
from dist_lora.utils.files import check_writable_dir

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
MANIFEST_FORMAT = "dist_lora.shards/1"


@dataclass
class PrepareOptions:
    resolution: int = 512
    trigger: str = ""
    shard_size: int = 1000  # samples per shard
    image_format: str = "png"
    overwrite: bool = False


@dataclass
class PrepareReport:
    found: int = 0
    accepted: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0
    samples_with_repeats: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"found {self.found} images: {self.accepted} accepted, {len(self.rejected)} rejected; "
                 f"{self.shards} shards, {self.samples_with_repeats} samples per epoch with repeats "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  rejected {r['path']}: {r['reason']}" for r in self.rejected]
        return "\n".join(lines)


def resize_and_crop(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Scale the shorter side to ``size`` and centre-crop a square; return the crop's (top, left)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized.crop((left, top, left + size, top + size)), (top, left)


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _sample_key(relative: str, used: set[str]) -> str:
    # WebDataset splits a member name at its first dot, so keys carry none.
    base = relative.rsplit(".", 1)[0].replace(".", "_")
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _encode_sample(src: SourceImage, key: str, opts: PrepareOptions) -> dict[str, bytes]:
    with Image.open(src.path) as opened:
        opened.load()
        image = _to_rgb(opened)
    original_w, original_h = image.size
    cropped, (top, left) = resize_and_crop(image, opts.resolution)
    buffer = io.BytesIO()
    cropped.save(buffer, format="PNG" if opts.image_format == "png" else "JPEG", quality=95)
    meta = {
        "original_size": [original_h, original_w],
        "crop_top_left": [top, left],
        "target_size": [opts.resolution, opts.resolution],
        "repeats": src.repeats,
        "folder": src.folder,
        "source": src.relative,
    }
    caption = read_caption(src, opts.trigger)
    return {"__key__": key.encode("utf-8"), opts.image_format: buffer.getvalue(),
            "txt": caption.encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical inputs give byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Writes samples into ``train-%06d.tar`` files of at most ``shard_size`` samples."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None

    def add(self, sample: dict[str, bytes], repeats: int) -> None:
        if self._tar is None or self.shards[-1]["samples"] >= self.shard_size:
            self.close()
            name = f"train-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(self.folder / name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self.shards.append({"file": name, "samples": 0, "samples_with_repeats": 0})
        key = sample["__key__"].decode("utf-8")
        for ext, data in sample.items():
            if ext != "__key__":
                _add_member(self._tar, f"{key}.{ext}", data)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["samples_with_repeats"] += repeats

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path '{out}' exists and is not a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder '{out}' is not empty; choose another folder or pass --overwrite.")
    check_writable_dir(out)


def prepare_dataset(src: str | Path, out: str | Path, opts: PrepareOptions | None = None) -> PrepareReport:
    opts = opts or PrepareOptions()
    src, out = Path(src), Path(out)
    if opts.image_format not in ("png", "jpg"):
        raise DatasetFolderError(f"image format {opts.image_format!r} is not supported; use 'png' or 'jpg'.")
    if opts.resolution < 64 or opts.resolution % 64:
        raise DatasetFolderError(f"resolution {opts.resolution} must be a multiple of 64 (and >= 64).")
    images = list(scan_images(src))  # raises DatasetFolderError for a missing or empty folder
    if not images:
        raise DatasetFolderError(f"dataset folder '{src}' has concept folders but no images "
                         f"({', '.join(sorted(e for e in ('.png', '.jpg', '.jpeg', '.webp', '.bmp')))}).")
    _check_output(out, opts.overwrite)

    started = time.perf_counter()
    report = PrepareReport(found=len(images))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tag_frequency: dict[str, Counter[str]] = {}
    try:
        sink = _ShardSink(staging, opts.shard_size)
        used_keys: set[str] = set()
        for image in images:
            key = _sample_key(image.relative, used_keys)
            try:
                sample = _encode_sample(image, key, opts)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                report.rejected.append({"path": image.relative, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            sink.add(sample, image.repeats)
            report.accepted += 1
            tags = [t.strip() for t in sample["txt"].decode("utf-8").split(",") if t.strip()]
            tag_frequency.setdefault(image.folder, Counter()).update(tags)
        sink.close()
        if report.accepted == 0:
            raise DatasetFolderError(f"dataset folder '{src}': no image could be read; see the reasons: "
                             f"{report.rejected[:3]}")
        report.shards = len(sink.shards)
        report.samples_with_repeats = sum(s["samples_with_repeats"] for s in sink.shards)
        report.seconds = time.perf_counter() - started
        manifest = {
            "format": MANIFEST_FORMAT,
            "resolution": opts.resolution,
            "image_format": opts.image_format,
            "num_samples": report.accepted,
            "num_samples_with_repeats": report.samples_with_repeats,
            "shards": sink.shards,
            "tag_frequency": {k: dict(v) for k, v in tag_frequency.items()},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        report_data = {"found": report.found, "accepted": report.accepted, "rejected": report.rejected}
        (staging / REPORT_NAME).write_text(json.dumps(report_data, indent=1, ensure_ascii=False), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report
