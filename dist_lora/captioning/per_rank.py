"""Going over a folder's images in batches, each process its share: the part `tag` and `caption` share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dist_lora import parallel
from dist_lora.captioning.files import CaptionFiles
from dist_lora.data.images import RejectedImage, open_image


@dataclass
class CaptionReport:
    images: int = 0  # in the folder (all ranks)
    captioned: int = 0
    kept: int = 0  # already captioned, left as they are
    unreadable: list[dict[str, str]] = field(default_factory=list)
    frequency: Counter[str] = field(default_factory=Counter)  # tags written (tagging)

    def merge(self, other: CaptionReport) -> None:
        self.captioned += other.captioned
        self.kept += other.kept
        self.unreadable += other.unreadable
        self.frequency.update(other.frequency)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "captioned": self.captioned, "kept": self.kept,
                "unreadable": self.unreadable, "tag_frequency": dict(self.frequency.most_common())}


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def caption_images(images: list[Path], files: CaptionFiles, describe: Callable[[list[Image.Image]], list[list[str]]],
                   *, batch_size: int, progress: bool, what: str, count_tags: bool = True) -> CaptionReport:
    """Write ``describe``'s tags (or one-element caption lists) for the images that need a caption (see
    ``CaptionFiles.wanted``); under a launcher each rank takes every world-size-th image. Returns the
    report of all ranks, on every rank; with ``count_tags`` (tagging) it counts the tags written."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1.")
    parallel.adopt_slurm_tasks()  # `srun -n 8 dist-lora tag ...` with Slurm's task variables alone
    rank, size = parallel.launched_rank(), parallel.launched_world_size()
    if size > 1:
        world = parallel.process_world()
        rank, size = world.rank, world.size
    mine = images[rank::size]
    todo = [p for p in mine if files.wanted(p)]
    report = CaptionReport(kept=len(mine) - len(todo))
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=f"{what} (rank {rank})" if size > 1 else what, unit="image",
              disable=not progress, position=rank, leave=True) as bar:
        for batch in _batches(todo, batch_size):
            readable, opened = [], []
            for path in batch:
                try:
                    opened.append(open_image(path, min_side=1))
                    readable.append(path)
                except RejectedImage as exc:
                    report.unreadable.append({"path": str(path), "reason": str(exc)})
            if opened:
                for path, tags in zip(readable, describe(opened), strict=True):
                    files.write(path, tags)
                    if count_tags:
                        report.frequency.update(tags)
                    report.captioned += 1
            bar.update(len(batch))
    if size > 1:
        parts = parallel.gather_to_all(report)
        report = CaptionReport()
        for part in parts:
            report.merge(part)
    report.images = len(images)
    return report
