"""Reading a kohya_ss-style training folder: ``<repeats>_<class name>/image.png`` + ``image.txt``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dist_lora.errors import DistLoraError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_EXTENSIONS = (".txt", ".caption")
_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetFolderError(DistLoraError):
    """The source folder cannot be used; the message names it and shows the expected layout."""


@dataclass(frozen=True)
class SourceImage:
    path: Path
    relative: str  # path relative to the dataset root, e.g. "20_robot/001.png"
    folder: str  # e.g. "20_robot"
    class_name: str  # e.g. "robot"
    repeats: int
    caption_path: Path | None


def _caption_for(image: Path) -> Path | None:
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def concept_folders(root: Path) -> list[tuple[Path, int, str]]:
    """The ``<repeats>_<name>`` sub-folders of ``root``, sorted by name."""
    if not root.exists():
        raise DatasetFolderError(f"dataset folder '{root}' does not exist.")
    if not root.is_dir():
        raise DatasetFolderError(f"dataset path '{root}' is not a folder.")
    found = []
    for child in sorted(root.iterdir()):
        match = _FOLDER.match(child.name)
        if child.is_dir() and match:
            found.append((child, int(match[1]), match[2]))
    if not found:
        names = sorted(p.name for p in root.iterdir())[:5]
        raise DatasetFolderError(
            f"dataset folder '{root}' has no '<repeats>_<name>' sub-folders (e.g. '20_robot/' holding "
            f"images and .txt captions); it contains: {names or 'nothing'}.")
    return found


def scan_images(root: Path) -> Iterator[SourceImage]:
    """Every file with an image extension under the concept folders (recursively), in sorted order."""
    for folder, repeats, class_name in concept_folders(root):
        if repeats < 1:
            raise DatasetFolderError(f"folder '{folder}': repeats must be >= 1, got {repeats}.")
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                yield SourceImage(path, path.relative_to(root).as_posix(), folder.name, class_name, repeats,
                                  _caption_for(path))


def read_caption(image: SourceImage, trigger: str) -> str:
    """The image's caption (its .txt/.caption file, else the folder's class name), trigger word first."""
    if image.caption_path is not None:
        raw = image.caption_path.read_bytes()
        try:
            caption = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            caption = raw.decode("latin-1")
        caption = " ".join(caption.split())
    else:
        caption = image.class_name
    if trigger and not caption.startswith(trigger):
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption
