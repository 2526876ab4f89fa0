"""`dist-lora tag`: a folder's images tagged by a WD14 tagger, each process its share of the images."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora import parallel
from dist_lora.captioning.files import CaptionFiles, find_images
from dist_lora.captioning.wd14 import TagOptions, Wd14Tagger, resolve_tagger, select_tags
from dist_lora.data.images import RejectedImage, open_image


@dataclass
class TagReport:
    images: int = 0  # in the folder (all ranks)
    tagged: int = 0
    kept: int = 0  # already captioned, left as they are
    unreadable: list[dict[str, str]] = field(default_factory=list)
    frequency: Counter[str] = field(default_factory=Counter)

    def merge(self, other: TagReport) -> None:
        self.tagged += other.tagged
        self.kept += other.kept
        self.unreadable += other.unreadable
        self.frequency.update(other.frequency)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "tagged": self.tagged, "kept": self.kept,
                "unreadable": self.unreadable, "tag_frequency": dict(self.frequency.most_common())}


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def tag_folder(src: str | Path, model: str, opts: TagOptions, files: CaptionFiles, *, batch_size: int = 8,
               recursive: bool = False, progress: bool = True) -> TagReport:
    """Tag the images of ``src`` that need a caption (see ``CaptionFiles.wanted``); under a launcher each
    rank takes every world-size-th image. Returns the report of all ranks, on every rank."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1.")
    images = find_images(src, recursive)  # inputs checked before the model loads
    tagger = Wd14Tagger(resolve_tagger(model))
    rank, size = parallel.launched_rank(), parallel.launched_world_size()
    if size > 1:
        world = parallel.process_world()
        rank, size = world.rank, world.size
    mine = images[rank::size]
    todo = [p for p in mine if files.wanted(p)]
    report = TagReport(kept=len(mine) - len(todo))
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=f"tagging (rank {rank})" if size > 1 else "tagging", unit="image",
              disable=not progress, position=rank, leave=True) as bar:
        for batch in _batches(todo, batch_size):
            readable, arrays = [], []
            for path in batch:
                try:
                    arrays.append(tagger.preprocess(open_image(path, min_side=1)))
                    readable.append(path)
                except RejectedImage as exc:
                    report.unreadable.append({"path": str(path), "reason": str(exc)})
            if arrays:
                for path, probs in zip(readable, tagger.probabilities(arrays), strict=True):
                    tags = select_tags(probs, tagger.table, opts)
                    files.write(path, tags)
                    report.frequency.update(tags)
                    report.tagged += 1
            bar.update(len(batch))
    if size > 1:
        reports = parallel.gather_to_all(report)
        report = TagReport()
        for part in reports:
            report.merge(part)
    report.images = len(images)
    return report
