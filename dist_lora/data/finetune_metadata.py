"""Reading sd-scripts' fine-tuning subsets: a metadata file that lists images with their captions and tags.

The metadata is sd-scripts' JSON object ``{image key: {"caption": ..., "tags": ...}}`` (what its
``finetune/merge_*_to_metadata.py`` scripts write; other fields such as ``train_resolution`` are not
needed here), or its JSONL form, one ``{"image_path": ..., "caption": ..., "tags": ...}`` per line.
An image key is a path, absolute or relative to the subset's ``image_dir``, with or without its file
extension (the merge scripts write the bare file name by default). The caption is the caption, then
the tags, joined by a comma as sd-scripts joins them (``caption_separator``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_lora.data.dataset_config import SubsetSpec
from dist_lora.data.kohya import IMAGE_EXTENSIONS, DatasetFolderError, SourceImage


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """Image key -> its entry, from a .json or .jsonl metadata file, every entry checked."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFolderError(f"metadata_file '{path}' cannot be read: {exc}") from exc
    if path.suffix.lower() == ".jsonl":
        entries: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = _parse(path, line, f"line {number}")
            if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                raise DatasetFolderError(f"metadata_file '{path}', line {number}: expected an object with "
                                         f"\"image_path\" (and \"caption\", \"tags\"), got {line.strip()[:80]!r}.")
            entries[row["image_path"]] = row
    else:
        loaded = _parse(path, text, "the file")
        if not isinstance(loaded, dict):
            raise DatasetFolderError(f"metadata_file '{path}' holds a JSON {type(loaded).__name__}; sd-scripts' "
                                     f"metadata is an object of image key -> {{\"caption\": ..., \"tags\": ...}}.")
        entries = loaded
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise DatasetFolderError(f"metadata_file '{path}': entry '{key}' is a {type(entry).__name__}; expected "
                                     f"an object such as {{\"caption\": \"...\", \"tags\": \"...\"}}.")
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise DatasetFolderError(f"metadata_file '{path}': entry '{key}' has {field} = {entry[field]!r}; "
                                         f"expected a string.")
    if not entries:
        raise DatasetFolderError(f"metadata_file '{path}' lists no images.")
    return entries


def _parse(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DatasetFolderError(f"metadata_file '{path}', {where}: not valid JSON ({exc}).") from exc


def metadata_caption(entry: dict[str, Any], per_line: bool = False) -> str:
    """sd-scripts' FineTuningDataset: the caption, then the tags after a separator (','); with wildcards
    (``per_line``), the tags after each of the caption's lines."""
    caption, tags = entry.get("caption") or "", entry.get("tags") or ""
    if not tags:
        return caption
    if per_line:
        lines = [line for line in caption.split("\n") if line.strip()]
        return "\n".join(f"{line},{tags}" for line in lines) if lines else tags
    return f"{caption},{tags}" if caption else tags


def _image_for(key: str, subset: SubsetSpec, metadata: Path) -> Path:
    given = Path(key)
    if not given.is_absolute():
        if subset.image_dir is None:
            raise DatasetFolderError(f"{subset.where}: metadata_file '{metadata}' names image '{key}' by a relative "
                                     f"path; set the subset's image_dir (the folder it is relative to), as "
                                     f"sd-scripts requires.")
        given = subset.image_dir / given
    if given.is_file() and given.suffix.lower() in IMAGE_EXTENSIONS:
        return given
    for extension in sorted(IMAGE_EXTENSIONS):  # a key without its extension (merge scripts' default)
        for candidate in (given.with_name(given.name + extension), given.with_name(given.name + extension.upper())):
            if candidate.is_file():
                return candidate
    raise DatasetFolderError(f"{subset.where}: metadata_file '{metadata}' lists image '{key}', but neither "
                             f"'{given}' nor '{given}.<{'|'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}>' is an "
                             f"image file.")


def scan_metadata_subset(subset: SubsetSpec, index: int, wildcard: bool = False) -> list[SourceImage]:
    """The images a fine-tuning subset's metadata lists, sorted by key, with their captions. Relative
    paths start with the subset's index, so two subsets may list files of the same name. Captions keep
    every line where the subset's enable_wildcard, else ``wildcard``, says so."""
    assert subset.metadata_file is not None
    metadata = subset.metadata_file
    prefix = f"{index:02d}_{metadata.stem}"
    lines = bool(subset.captions.get("wildcard", wildcard))
    images = []
    for key, entry in sorted(read_metadata(metadata).items()):
        path = _image_for(key, subset, metadata)
        inside = path.relative_to(subset.image_dir).as_posix() if subset.image_dir is not None and \
            path.is_relative_to(subset.image_dir) else path.as_posix().lstrip("/")
        images.append(SourceImage(path, f"{prefix}/{inside}", prefix, "", subset.num_repeats, None, False, index,
                                  subset.caption_prefix, subset.caption_suffix, subset.random_crop,
                                  subset.alpha_mask, caption_text=metadata_caption(entry, lines),
                                  caption_lines=lines))
    return images
