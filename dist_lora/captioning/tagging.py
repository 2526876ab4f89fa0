"""`dist-lora tag`: a folder's images tagged by a WD14 tagger, each process its share of the images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dist_lora.captioning.files import CaptionFiles, find_images
from dist_lora.captioning.per_rank import CaptionReport, caption_images
from dist_lora.captioning.wd14 import TagOptions, Wd14Tagger, resolve_tagger, select_tags


def tag_folder(src: str | Path, model: str, opts: TagOptions, files: CaptionFiles, *, batch_size: int = 8,
               recursive: bool = False, progress: bool = True) -> CaptionReport:
    images = find_images(src, recursive)  # inputs checked before the model loads
    tagger = Wd14Tagger(resolve_tagger(model))

    def describe(batch: list[Image.Image]) -> list[list[str]]:
        probs = tagger.probabilities([tagger.preprocess(image) for image in batch])
        return [select_tags(p, tagger.table, opts) for p in probs]

    return caption_images(images, files, describe, batch_size=batch_size, progress=progress, what="tagging")
