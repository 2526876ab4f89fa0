"""WD14-style taggers (SmilingWolf's wd-*-tagger-v3 family and the v2 ones kohya uses): an ONNX model with
an NHWC BGR input of side N (448) and one sigmoid output per tag, and ``selected_tags.csv`` (tag_id, name,
category, count; category 9 rating, 0 general, 4 character), run through onnxruntime.

The tags chosen are those kohya's ``finetune/tag_images_by_wd14_tagger.py`` chooses: general tags at or
above the general threshold and character tags at or above the character threshold, in the file's order
(each character tag put first with ``character_tags_first``), undesired tags left out, the most likely
rating first or last when asked, then the ``always_first_tags`` moved to the front.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dist_lora.errors import DistLoraError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_MODEL = "SmilingWolf/wd-vit-tagger-v3"
RATING, GENERAL, CHARACTER = "9", "0", "4"
_COLUMNS = ["tag_id", "name", "category", "count"]


@dataclass(frozen=True)
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: frozenset[str] = frozenset()
    always_first_tags: tuple[str, ...] = ()
    remove_underscore: bool = False
    use_rating_tags: bool = False  # the most likely rating first
    use_rating_tags_as_last_tag: bool = False  # ... or last
    character_tags_first: bool = False


@dataclass(frozen=True)
class TagTable:
    names: list[str]
    categories: list[str]

    def display(self, remove_underscore: bool) -> list[str]:
        # kohya keeps short tags as they are: emoticons such as ^_^ would lose their meaning.
        return [n.replace("_", " ") if remove_underscore and len(n) > 3 else n for n in self.names]


def read_tag_table(path: Path) -> TagTable:
    if not path.is_file():
        raise DistLoraError(f"tagger '{path.parent}' has no {TAGS_FILE} (the tags of its outputs).")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0][:4]] != _COLUMNS:
        raise DistLoraError(f"'{path}' is not a WD14 tag list: its header must be {','.join(_COLUMNS)}, got "
                            f"{','.join(rows[0]) if rows else 'an empty file'}.")
    body = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(body) if len(r) < 3 or r[2].strip() not in (RATING, GENERAL, CHARACTER)]
    if bad:
        raise DistLoraError(f"'{path}' line {bad[0]}: the category must be 9 (rating), 0 (general) or 4 (character).")
    return TagTable([r[1] for r in body], [r[2].strip() for r in body])


def select_tags(probs: np.ndarray, table: TagTable, opts: TagOptions) -> list[str]:
    """One image's tags from its sigmoid outputs (kohya's order)."""
    names = table.display(opts.remove_underscore)
    tags: list[str] = []
    for i, (name, category) in enumerate(zip(names, table.categories, strict=True)):
        if name in opts.undesired_tags or category == RATING:
            continue
        if category == GENERAL and probs[i] >= opts.general_threshold:
            tags.append(name)
        elif category == CHARACTER and probs[i] >= opts.character_threshold:
            if opts.character_tags_first:
                tags.insert(0, name)
            else:
                tags.append(name)
    if opts.use_rating_tags or opts.use_rating_tags_as_last_tag:
        ratings = [i for i, c in enumerate(table.categories) if c == RATING]
        if ratings:
            rating = names[max(ratings, key=lambda i: (probs[i], -i))]  # argmax: the first of equals
            if rating not in opts.undesired_tags:
                if opts.use_rating_tags:
                    tags.insert(0, rating)
                else:
                    tags.append(rating)
    for tag in opts.always_first_tags:
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def resolve_tagger(model: str) -> Path:
    """A local folder holding model.onnx and selected_tags.csv, or a hub repository id downloaded into the
    hub cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        missing = [f for f in (MODEL_FILE, TAGS_FILE) if not (folder / f).is_file()]
        if missing:
            raise DistLoraError(f"tagger folder '{folder}' has no {' and no '.join(missing)}; a WD14 tagger is "
                                f"{MODEL_FILE} with {TAGS_FILE} beside it.")
        return folder
    if folder.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise DistLoraError(f"--model '{model}' is neither a folder with {MODEL_FILE} and {TAGS_FILE} nor a hub id "
                            f"such as {DEFAULT_MODEL}.")
    from huggingface_hub import hf_hub_download

    try:
        paths = [Path(hf_hub_download(model, name)) for name in (MODEL_FILE, TAGS_FILE)]
    except Exception as exc:  # offline, missing repository or file: the hub raises several types
        raise DistLoraError(f"could not get {MODEL_FILE} and {TAGS_FILE} of '{model}' from the hub ({exc}); "
                            f"download them into a folder and give --model that folder.") from exc
    return paths[0].parent


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise DistLoraError("tagging needs onnxruntime: pip install 'dist-lora[tagging]' (or onnxruntime-gpu on "
                            "CUDA machines).") from exc
    return onnxruntime


@dataclass
class Wd14Tagger:
    folder: Path
    table: TagTable = field(init=False)
    side: int = field(init=False)

    def __post_init__(self) -> None:
        self.table = read_tag_table(self.folder / TAGS_FILE)
        ort = _onnxruntime()
        # One GPU per process under a launcher: its local rank's.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        available = ort.get_available_providers()
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": local_rank})] \
            if "CUDAExecutionProvider" in available else []
        providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise DistLoraError(f"'{self.folder / MODEL_FILE}' is not an ONNX model onnxruntime can load: "
                                f"{exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if inputs else []
        if len(inputs) != 1 or len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) \
                or shape[1] != shape[2]:
            raise DistLoraError(f"'{self.folder / MODEL_FILE}' is not a WD14 tagger: its input is {shape}, not "
                                f"[batch, N, N, 3] (square NHWC BGR images).")
        width = outputs[0].shape[-1] if outputs else None
        if len(outputs) < 1 or (isinstance(width, int) and width != len(self.table.names)):
            raise DistLoraError(f"'{self.folder / MODEL_FILE}' gives {width} outputs; {TAGS_FILE} lists "
                                f"{len(self.table.names)} tags: they are not one tagger.")
        self.side = int(shape[1])
        self.input_name = inputs[0].name

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the taggers were trained on it: padded to a square with white, resized to the
        input side (area averaging when shrinking, Lanczos when enlarging), BGR, float32 0..255."""
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        resample = Image.Resampling.BOX if side > self.side else Image.Resampling.LANCZOS
        resized = square.resize((self.side, self.side), resample)
        return np.asarray(resized, dtype=np.float32)[:, :, ::-1].copy()

    def probabilities(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        (probs,) = self.session.run(None, {self.input_name: np.stack(batch)})[:1]
        if probs.shape != (len(batch), len(self.table.names)):
            raise DistLoraError(f"'{self.folder / MODEL_FILE}' gave outputs of shape {probs.shape}; expected "
                                f"{(len(batch), len(self.table.names))}.")
        return np.asarray(probs)
