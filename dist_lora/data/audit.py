"""A dataset audit: near-duplicate images (perceptual hash), the same image in training and validation
(leakage) or in training and regularization, captions without the trigger or longer than the text
encoder reads, and how the tags cover the images. Run by `dist-lora prepare` (report.json) and
`dist-lora audit`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_HASH_DISTANCE = 4  # of 64 bits: resized, re-encoded or lightly edited copies of one picture
_CHUNK = 2048  # rows of the pairwise distance matrix computed at once


def perceptual_hash(image: Image.Image) -> str:
    """imagehash's pHash (64 bits, hex) of an RGB image: equal or close for copies of one picture."""
    import imagehash

    return str(imagehash.phash(image))


@dataclass(frozen=True)
class AuditItem:
    path: str  # as reported (relative to the dataset)
    split: str  # "train", "val" or "reg"
    phash: str
    caption: str


@dataclass
class AuditReport:
    images: int = 0
    duplicate_groups: list[list[str]] = field(default_factory=list)  # near-duplicates within training
    leakage: list[list[str]] = field(default_factory=list)  # groups with training and validation images
    train_reg: list[list[str]] = field(default_factory=list)  # groups with training and regularization images
    without_trigger: list[str] = field(default_factory=list)
    too_long: list[dict[str, Any]] = field(default_factory=list)  # captions over the token limit
    token_check: str = ""  # why the token lengths were not checked ('' when they were)
    tag_images: Counter[str] = field(default_factory=Counter)  # tag -> images holding it

    def to_json(self) -> dict[str, Any]:
        single = sorted(t for t, n in self.tag_images.items() if n == 1)
        return {"images": self.images, "near_duplicates": self.duplicate_groups, "train_val_leakage": self.leakage,
                "train_reg_duplicates": self.train_reg, "without_trigger": self.without_trigger,
                "captions_over_token_limit": self.too_long,
                **({"token_check_skipped": self.token_check} if self.token_check else {}),
                "tag_coverage": {"tags": len(self.tag_images), "on_one_image": len(single),
                                 "images_per_tag": dict(self.tag_images.most_common())}}

    def summary(self) -> list[str]:
        lines = [f"audit: {self.images} images; {len(self.duplicate_groups)} groups of near-duplicates, "
                 f"{len(self.leakage)} shared by training and validation, {len(self.train_reg)} by training and "
                 f"regularization; {len(self.without_trigger)} captions without the trigger; "
                 f"{len(self.too_long)} over the token limit{f' ({self.token_check})' if self.token_check else ''}"]
        for name, groups in (("near-duplicates", self.duplicate_groups), ("train/val leakage", self.leakage),
                             ("train/reg duplicates", self.train_reg)):
            lines += [f"  {name}: {', '.join(group)}" for group in groups[:10]]
        lines += [f"  caption over {c['limit']} tokens ({c['tokens']}): {c['path']}" for c in self.too_long[:10]]
        if self.tag_images:
            top = ", ".join(f"{t} ({n})" for t, n in self.tag_images.most_common(10))
            lines.append(f"  tag coverage: {len(self.tag_images)} tags; most frequent: {top}")
        return lines


def _bits(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def near_groups(hashes: Sequence[str], max_distance: int) -> list[list[int]]:
    """Indices of images within ``max_distance`` bits of each other, linked transitively (groups of 2+)."""
    values = _bits(hashes)
    parent = list(range(len(values)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(values), _CHUNK):
        block = values[start:start + _CHUNK]
        distance = np.bitwise_count(block[:, None] ^ values[None, :])
        for i, j in zip(*np.nonzero(distance <= max_distance), strict=True):
            a, b = root(start + int(i)), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(values)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _tags(caption: str) -> set[str]:
    return {t.strip() for line in caption.splitlines() for t in line.split(",") if t.strip()}


def audit(items: Sequence[AuditItem], *, trigger: str = "", max_distance: int = DEFAULT_HASH_DISTANCE,
          tokenizer: Any = None, max_tokens: int = 75) -> AuditReport:
    """``tokenizer``: a CLIP tokenizer (transformers) to count caption tokens with, or None to skip that
    check; ``max_tokens``: what the text encoder reads without BOS/EOS (75, or 150 / 225 with kohya's
    max_token_length)."""
    report = AuditReport(images=len(items))
    for group in near_groups([i.phash for i in items], max_distance):
        members = [items[i] for i in group]
        splits = {m.split for m in members}
        names = sorted(m.path for m in members)
        if "train" in splits and "val" in splits:
            report.leakage.append(names)
        if "train" in splits and "reg" in splits:
            report.train_reg.append(names)
        train = sorted(m.path for m in members if m.split == "train")
        if len(train) > 1:
            report.duplicate_groups.append(train)
    if trigger:
        report.without_trigger = sorted(i.path for i in items if i.split != "reg" and trigger not in _tags(i.caption)
                                        and trigger not in i.caption)
    if tokenizer is None:
        report.token_check = "no tokenizer given"
    else:
        for item in items:
            for line in item.caption.splitlines() or [""]:
                tokens = len(tokenizer(line, add_special_tokens=False)["input_ids"])
                if tokens > max_tokens:
                    report.too_long.append({"path": item.path, "tokens": tokens, "limit": max_tokens})
                    break
    for item in items:
        if item.split != "reg":
            report.tag_images.update(_tags(item.caption))
    return report


def load_tokenizer(path: str | Path) -> Any:
    """A CLIP tokenizer from a folder: a tokenizer folder, or a diffusers model folder (its tokenizer/)."""
    from transformers import CLIPTokenizer

    from dist_lora.errors import DistLoraError

    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) \
            and not (folder / "tokenizer.json").is_file():
        raise DistLoraError(f"--tokenizer '{path}' is not a CLIP tokenizer folder (or a diffusers folder with "
                            f"tokenizer/): it has no vocab.json and merges.txt (or tokenizer.json).")
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise DistLoraError(f"--tokenizer '{path}' is not a CLIP tokenizer folder (or a diffusers folder with "
                            f"tokenizer/): {exc}") from exc


def file_hash(path: Path, data: bytes | None = None) -> str:
    """The perceptual hash of an image file, or of ``data``, its bytes (for images an earlier prepare encoded
    before hashes were kept)."""
    from dist_lora.data.images import open_image

    return perceptual_hash(open_image(path, min_side=1, data=data))
