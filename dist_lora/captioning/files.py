"""Which images of a folder get a caption file, and writing it: beside the image, atomically, never over
an existing caption unless asked (``overwrite`` replaces it, ``append`` adds the tags it lacks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_lora.data.kohya import IMAGE_EXTENSIONS
from dist_lora.errors import DistLoraError
from dist_lora.utils.files import write_text_atomic


@dataclass(frozen=True)
class CaptionFiles:
    extension: str = ".txt"  # kohya's --caption_extension
    overwrite: bool = False
    append: bool = False  # kohya's --append_tags: keep the existing tags, add the new ones after them
    separator: str = ", "  # kohya's --caption_separator

    def __post_init__(self) -> None:
        if not self.extension.startswith(".") or len(self.extension) < 2:
            raise DistLoraError(f"--caption-extension '{self.extension}' must start with a dot, e.g. .txt")
        if self.overwrite and self.append:
            raise DistLoraError("--overwrite and --append-tags: choose one (replace captions, or add to them).")

    def path_for(self, image: Path) -> Path:
        return image.with_suffix(self.extension)

    def wanted(self, image: Path) -> bool:
        """Whether ``image`` gets a caption now: it has none, or the existing one is to be replaced or added to
        (so an interrupted run continues where it stopped)."""
        return self.overwrite or self.append or not self.path_for(image).is_file()

    def write(self, image: Path, tags: list[str]) -> str:
        """Write the caption of ``image``; return what was written."""
        path = self.path_for(image)
        if self.append and path.is_file():
            existing = [t.strip() for t in path.read_text(encoding="utf-8").split(self.separator.strip())
                        if t.strip()]
            tags = existing + [t for t in tags if t not in existing]
        text = self.separator.join(tags)
        write_text_atomic(path, text)
        return text


def find_images(src: str | Path, recursive: bool = False) -> list[Path]:
    """The images in ``src`` (and its subfolders with ``recursive``), sorted; an error names a missing or
    empty folder."""
    folder = Path(src)
    if not folder.is_dir():
        raise DistLoraError(f"image folder '{folder}' {'is not a folder' if folder.exists() else 'does not exist'}.")
    pattern = "**/*" if recursive else "*"
    images = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not images:
        hint = "" if recursive else " (--recursive looks in subfolders too)"
        raise DistLoraError(f"image folder '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                            f"{hint}.")
    return images
