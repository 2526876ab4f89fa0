"""Reading kohya-style image folders: a training folder of ``<repeats>_<class name>/image.png`` +
``image.txt``, or the flat image folder of a dataset config's subset."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from glob import escape as glob_escape
from pathlib import Path

from PIL import Image

from dist_lora.data.dataset_config import SubsetSpec
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
    is_reg: bool = False  # regularization image (prior preservation)
    subset: int | None = None  # index of its dataset-config subset
    caption_prefix: str = ""  # put before / after the caption (a subset's caption_prefix / suffix)
    caption_suffix: str = ""
    random_crop: bool | None = None  # a subset's own encoding options (None: the prepare command's)
    alpha_mask: bool | None = None
    mask_path: Path | None = None  # its mask image, for masked loss
    caption_text: str | None = None  # its caption when it has no caption file (a fine-tuning subset's metadata)
    caption_lines: bool = False  # keep every line of the caption (wildcards) instead of sd-scripts' first line
    data: bytes | None = None  # the image file's bytes when it is a member of a WebDataset shard (path: its URL)


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


def scan_images(root: Path, *, is_reg: bool = False) -> Iterator[SourceImage]:
    """Every file with an image extension under the concept folders (recursively), in sorted order.

    Regularization images get a ``reg/`` prefix on their relative path, so they never collide with
    training images of the same name."""
    prefix = "reg/" if is_reg else ""
    for folder, repeats, class_name in concept_folders(root):
        if repeats < 1:
            raise DatasetFolderError(f"folder '{folder}': repeats must be >= 1, got {repeats}.")
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                yield SourceImage(path, prefix + path.relative_to(root).as_posix(), folder.name, class_name,
                                  repeats, _caption_for(path), is_reg)


def find_mask(mask_dir: Path, stem: str, key: str) -> Path:
    """The mask image for the image named ``stem`` (relative to its folder): ``mask_dir/stem.<image ext>``."""
    for candidate in sorted(mask_dir.glob(f"{glob_escape(stem)}.*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
    raise DatasetFolderError(f"{key} '{mask_dir}' has no mask for image '{stem}' (expected '{mask_dir / stem}.png' "
                             f"or another image type); every image needs its mask.")


def with_masks(images: list[SourceImage], mask_dir: Path, key: str) -> list[SourceImage]:
    """A kohya folder's images with their masks from ``mask_dir``, which mirrors the folder's layout."""
    if not mask_dir.is_dir():
        raise DatasetFolderError(f"{key} '{mask_dir}' is not a folder of mask images.")
    return [replace(image, mask_path=find_mask(mask_dir, image.relative.rsplit(".", 1)[0], key)) for image in images]


def _oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header alone."""
    with Image.open(path) as opened:
        width, height = opened.size
        turned = opened.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def check_mask_sizes(images: list[SourceImage], key: str) -> None:
    """Every mask has its image's size (read from the headers): checked before anything is written.
    ``key`` names the setting the masks came from."""
    for image in images:
        if image.mask_path is None:
            continue
        try:
            sizes = _oriented_size(image.path), _oriented_size(image.mask_path)
        except (OSError, SyntaxError, ValueError):
            continue  # an unreadable image is rejected with its reason when it is encoded
        if sizes[0] != sizes[1]:
            raise DatasetFolderError(f"{key}: mask '{image.mask_path}' is {sizes[1][0]}x{sizes[1][1]} but its image "
                                     f"'{image.path}' is {sizes[0][0]}x{sizes[0][1]}; a mask must have its "
                                     f"image's size.")


def scan_subset(subset: SubsetSpec, index: int, caption_extension: str = ".caption",
                wildcard: bool = False) -> list[SourceImage]:
    """The images directly in a subset's folder (sd-scripts reads no sub-folders), sorted; their caption
    files have the subset's caption_extension, else ``caption_extension``. Relative paths start with the
    subset's index, so two subsets may hold files of the same name. Their captions keep every line where
    the subset's enable_wildcard, else ``wildcard``, says so."""
    folder = subset.image_dir
    prefix = f"{index:02d}_{folder.name}"
    extension = subset.caption_extension or caption_extension
    images = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            caption = path.with_suffix(extension)
            mask = find_mask(subset.mask_dir, path.stem, f"{subset.where}.conditioning_data_dir") \
                if subset.mask_dir is not None else None
            images.append(SourceImage(path, f"{prefix}/{path.name}", prefix, subset.class_tokens, subset.num_repeats,
                                      caption if caption.is_file() else None, subset.is_reg, index,
                                      subset.caption_prefix, subset.caption_suffix, subset.random_crop,
                                      subset.alpha_mask, mask,
                                      caption_lines=subset.captions.get("wildcard", wildcard)))
    if not images:
        raise DatasetFolderError(f"{subset.where}.image_dir '{folder}' holds no images "
                                 f"({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return images


def read_caption(image: SourceImage, trigger: str) -> tuple[str, str]:
    """The image's caption with the trigger first, and a warning ('' if none); see ``read_captions``."""
    caption, _, warning = read_captions(image, trigger)
    return caption, warning


def read_captions(image: SourceImage, trigger: str) -> tuple[str, str, str]:
    """The image's caption (its caption file, else the class name) with the trigger word first, the same
    without the trigger (what the dataset audit checks), and a warning ('' if none) when the file was not
    UTF-8 and was decoded as Windows-1252/Latin-1, or when a subset image has neither a caption file nor
    class tokens.

    A subset image's caption is the first line of its file (or of its metadata caption), between the
    subset's prefix and suffix, as sd-scripts reads it; a folder image's caption is the whole file, its
    line breaks made spaces. With ``caption_lines`` (wildcards) every non-empty line is kept, each with
    the prefix, suffix and trigger, one per line."""
    warning = ""
    if image.caption_text is not None:
        text = image.caption_text
    elif image.caption_path is not None:
        raw = image.caption_path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            try:
                text = raw.decode("cp1252")
                encoding = "Windows-1252"
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
                encoding = "Latin-1"
            warning = (f"caption {image.caption_path.name} is not UTF-8 (byte {exc.start}); decoded as {encoding}, "
                       f"check the text and re-save it as UTF-8")
    else:
        text = image.class_name
        if image.subset is not None and not text:
            warning = "no caption file and no class_tokens: trained with an empty caption"
    if image.caption_lines:
        lines = [line for line in text.splitlines() if line.strip()] or [""]
    elif image.subset is not None:
        lines = text.split("\n")[:1]
    else:
        lines = [text]
    plain = [" ".join(part for part in (image.caption_prefix, " ".join(line.split()), image.caption_suffix) if part)
             for line in lines]
    return "\n".join(_with_trigger(line, trigger) for line in plain), "\n".join(plain), warning


def _with_trigger(caption: str, trigger: str) -> str:
    if trigger and not caption.startswith(trigger):
        return f"{trigger}, {caption}" if caption else trigger
    return caption
