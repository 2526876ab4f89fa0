"""sd-scripts dataset configs (``--dataset_config``): ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``, read into the subsets `dist-lora prepare` writes into one manifest.

Options cascade as in sd-scripts: a subset's own value, else its dataset's, else ``[general]``'s. What
none of them sets comes from the prepare command line (bucket settings, resolution) or, for the
training-time options (captions, augmentation), from the training config's data.* keys: the manifest
records only what the dataset config set. Every key is checked before anything is read or written: a
key that would change training and has no counterpart here is refused with the reason, not ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dist_lora.errors import DistLoraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class DatasetConfigError(DistLoraError):
    """A dataset config that cannot be used; the message names the file and the key."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("expected true or false")


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("expected a whole number")


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError("expected a number")


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


def _rate(value: Any) -> float:
    rate = _float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError("expected a probability between 0 and 1")
    return rate


def _non_negative(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("expected 0 or more")
    return number


def _resolution(value: Any) -> int:
    """sd-scripts takes one side or [width, height]; buckets here have a square base."""
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, list):
        raise ValueError("a non-square base resolution [width, height] is not supported; give one side, e.g. 1024")
    side = _int(value)
    if side < 64 or side % 64:
        raise ValueError("expected a multiple of 64")
    return side


def _separator(value: Any) -> str:
    if _str(value) != ",":
        raise ValueError("captions are split into tags at commas only; remove the key or set it to ','")
    return ","


class UnsupportedKey(ValueError):
    """A key sd-scripts knows that has no counterpart here (the message says why)."""


def _unsupported(why: str) -> Callable[[Any], Any]:
    def refuse(value: Any) -> Any:
        raise UnsupportedKey(why)
    return refuse


# Options a subset, its dataset or [general] may set: name -> (checker, where it goes).
# Where: "caption:<CaptionTransform field>" (training time, per sample), "augment:<name>" (training time),
# "source:<name>" (how prepare reads the subset's files), "prepare:<PrepareOptions field>" (a dataset's),
# "training:<training config key>" (a dataset's), "none" (no effect here).
SUBSET_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "num_repeats": (_int, "source:num_repeats"),
    "class_tokens": (_str, "source:class_tokens"),
    "caption_extension": (_str, "source:caption_extension"),
    "caption_prefix": (_str, "source:caption_prefix"),
    "caption_suffix": (_str, "source:caption_suffix"),
    "shuffle_caption": (_bool, "caption:shuffle"),
    "keep_tokens": (_non_negative, "caption:keep_tokens"),
    "caption_dropout_rate": (_rate, "caption:caption_dropout"),
    "caption_tag_dropout_rate": (_rate, "caption:tag_dropout"),
    "caption_dropout_every_n_epochs": (_non_negative, "caption:dropout_every_n_epochs"),
    "caption_separator": (_separator, "none"),
    "cache_info": (_bool, "none"),
    "flip_aug": (_bool, "augment:flip"),
    "color_aug": (_bool, "augment:color"),
    "random_crop": (_bool, "source:random_crop"),
    "face_crop_aug_range": (_unsupported("face-crop augmentation is not implemented"), "none"),
    "keep_tokens_separator": (_str, "caption:keep_tokens_separator"),
    "secondary_separator": (_str, "caption:secondary_separator"),
    "enable_wildcard": (_bool, "caption:wildcard"),
    "token_warmup_min": (_unsupported("token warm-up is not implemented"), "none"),
    "token_warmup_step": (_unsupported("token warm-up is not implemented"), "none"),
    "custom_attributes": (_unsupported("custom attributes are not used here"), "none"),
    "resize_interpolation": (_unsupported("images are always resized with Lanczos"), "none"),
}
# Only on a subset.
SUBSET_ONLY_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "image_dir": (_str, "source:image_dir"),
    "is_reg": (_bool, "source:is_reg"),
    "alpha_mask": (_bool, "source:alpha_mask"),
    # A fine-tuning subset: captions (and tags) from a metadata file instead of caption files.
    "metadata_file": (_str, "source:metadata_file"),
    # sd-scripts' masked loss reads its masks from the conditioning images' red channel.
    "conditioning_data_dir": (_str, "source:mask_dir"),
}
# What only a DreamBooth-style subset (image files with caption files) takes; sd-scripts' schema refuses
# them on a fine-tuning subset or its dataset.
DREAMBOOTH_ONLY_KEYS = ("is_reg", "class_tokens", "caption_extension", "conditioning_data_dir")
# A dataset's (or [general]'s) settings. Its bucket set (resolution and bucket keys) is its own: datasets of
# several resolutions prepare into one folder with a bucket set each. The rest hold for the whole manifest
# (one batch size, one validation split).
BUCKET_KEYS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
               "bucket_no_upscale")
DATASET_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "resolution": (_resolution, "prepare:resolution"),
    "enable_bucket": (_bool, "prepare:buckets"),
    "min_bucket_reso": (_int, "prepare:min_bucket_side"),
    "max_bucket_reso": (_int, "prepare:max_bucket_side"),
    "bucket_reso_steps": (_int, "prepare:bucket_step"),
    "bucket_no_upscale": (_bool, "prepare:no_upscale"),
    "validation_split": (_float, "prepare:val_fraction"),
    "batch_size": (_int, "training:batch_size"),
    "prior_loss_weight": (_float, "training:prior_loss_weight"),
    "network_multiplier": (_unsupported("the adapter multiplier is 1 while training"), "none"),
    "validation_seed": (_unsupported("the validation split is drawn from a hash of each path, not a seed"), "none"),
    "debug_dataset": (_bool, "none"),
    "max_token_length": (_unsupported("set model.max_token_length in the training config"), "none"),
}


@dataclass(frozen=True)
class SubsetSpec:
    """One ``[[datasets.subsets]]``: a flat folder of images (and caption files), or the images a metadata
    file lists with their captions (a fine-tuning subset), with its options."""

    image_dir: Path | None  # None: a fine-tuning subset whose metadata names every image by absolute path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str = ""  # the caption of an image without a caption file
    caption_extension: str | None = None  # None: prepare --caption-extension (sd-scripts' default: .caption)
    caption_prefix: str = ""
    caption_suffix: str = ""
    captions: dict[str, Any] = field(default_factory=dict)  # CaptionTransform fields the config set
    augment: dict[str, Any] = field(default_factory=dict)  # Augment fields the config set
    random_crop: bool | None = None  # None: the prepare command's setting
    alpha_mask: bool | None = None
    mask_dir: Path | None = None  # masks for masked loss (sd-scripts: conditioning_data_dir)
    metadata_file: Path | None = None  # sd-scripts' fine-tuning metadata (.json, or .jsonl)
    where: str = ""  # "datasets[0].subsets[1]", for messages
    buckets: dict[str, Any] = field(default_factory=dict)  # its dataset's bucket settings (PrepareOptions fields)

    def record(self) -> dict[str, Any]:
        """The subset's entry in the manifest."""
        return {"image_dir": str(self.image_dir) if self.image_dir else None,
                **({"metadata_file": str(self.metadata_file)} if self.metadata_file else {}),
                "num_repeats": self.num_repeats, "is_reg": self.is_reg,
                "class_tokens": self.class_tokens, "captions": dict(self.captions), "augment": dict(self.augment),
                **({"mask_dir": str(self.mask_dir)} if self.mask_dir else {}),
                **({"alpha_mask": self.alpha_mask} if self.alpha_mask is not None else {}),
                **({"random_crop": self.random_crop} if self.random_crop is not None else {}),
                **({"buckets": dict(self.buckets)} if self.buckets else {})}


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset config says: its subsets, the prepare settings it set for all of them (``prepare``:
    PrepareOptions fields; bucket settings that differ between datasets are each subset's ``buckets``) and
    the training settings it set (``training``: training config keys)."""

    path: Path
    subsets: list[SubsetSpec]
    prepare: dict[str, Any]
    training: dict[str, Any]


def _check(path: Path, where: str, key: str, value: Any, checker: Callable[[Any], Any]) -> Any:
    try:
        return checker(value)
    except ValueError as exc:
        raise DatasetConfigError(f"dataset config '{path}': {where}{key} = {value!r}: {exc}.") from exc


def _table(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DatasetConfigError(f"dataset config '{path}': {where} must be a table, got {type(value).__name__}.")
    return value


def _read_level(path: Path, where: str, table: dict[str, Any], allowed: dict[str, tuple[Callable[[Any], Any], str]],
                skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, str]]:
    """A level's keys, each checked: key -> (value, where it goes)."""
    out: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in allowed:
            raise DatasetConfigError(f"dataset config '{path}': unknown key {where}{key}; the keys a "
                                     f"{'subset' if 'subsets[' in where else 'dataset'} takes are "
                                     f"{', '.join(sorted(allowed))}.")
        checker, target = allowed[key]
        out[key] = (_check(path, where, key, value, checker), target)
    return out


def _subset(path: Path, where: str, options: dict[str, tuple[Any, str]]) -> SubsetSpec:
    if "image_dir" not in options and "metadata_file" not in options:
        raise DatasetConfigError(f"dataset config '{path}': {where} has no image_dir (the folder of its images) "
                                 f"and no metadata_file (a fine-tuning subset's captions).")
    source: dict[str, Any] = {}
    per_sample: dict[str, dict[str, Any]] = {"caption": {}, "augment": {}}
    for value, target in options.values():
        kind, _, name = target.partition(":")
        if kind == "source":
            source[name] = value
        elif kind in per_sample:
            per_sample[kind][name] = value
    image_dir = _folder(path, f"{where}.image_dir", source.pop("image_dir")) if "image_dir" in source else None
    if "metadata_file" in source:
        source["metadata_file"] = _file(path, f"{where}.metadata_file", source["metadata_file"])
    if "mask_dir" in source:
        source["mask_dir"] = _folder(path, f"{where}.conditioning_data_dir", source["mask_dir"])
    if source.get("num_repeats", 1) < 1:
        raise DatasetConfigError(f"dataset config '{path}': {where}.num_repeats = {source['num_repeats']} must be at "
                                 f"least 1.")
    return SubsetSpec(image_dir, captions=per_sample["caption"], augment=per_sample["augment"], where=where, **source)


def _check_fine_tuning(path: Path, where_d: str, where_s: str, own: dict[str, Any], dataset: dict[str, Any]) -> None:
    for key in DREAMBOOTH_ONLY_KEYS:
        for table, where in ((own, where_s + "."), (dataset, where_d)):
            if key in table:
                raise DatasetConfigError(f"dataset config '{path}': {where}{key} is set, but {where_s} is a "
                                         f"fine-tuning subset (metadata_file), which takes its captions from the "
                                         f"metadata; as in sd-scripts, {key} belongs to image-folder subsets.")


def _folder(path: Path, key: str, value: str) -> Path:
    return _existing(path, key, value, folder=True)


def _file(path: Path, key: str, value: str) -> Path:
    return _existing(path, key, value, folder=False)


def _existing(path: Path, key: str, value: str, *, folder: bool) -> Path:
    """``value`` (relative to the dataset config's folder), which must be an existing folder or file."""
    found = Path(value).expanduser()
    if not found.is_absolute():
        found = path.parent / found
    if not (found.is_dir() if folder else found.is_file()):
        kind = "a folder" if folder else "a file"
        raise DatasetConfigError(f"dataset config '{path}': {key} = '{found}' "
                                 f"{f'is not {kind}' if found.exists() else 'does not exist'}.")
    return found


def metadata_dataset(metadata_file: str | Path, image_dir: str | Path | None, repeats: int = 1) -> DatasetSpec:
    """sd-scripts' command-line fine-tuning dataset (in_json, train_data_dir, dataset_repeats): one subset."""
    metadata = Path(metadata_file).expanduser()
    if not metadata.is_file():
        raise DatasetConfigError(f"--metadata-file '{metadata}' "
                                 f"{'is not a file' if metadata.exists() else 'does not exist'}.")
    folder = Path(image_dir).expanduser() if image_dir else None
    if folder is not None and not folder.is_dir():
        raise DatasetConfigError(f"images folder '{folder}' (for --metadata-file '{metadata}') "
                                 f"{'is not a folder' if folder.exists() else 'does not exist'}.")
    if repeats < 1:
        raise DatasetConfigError(f"--repeats {repeats} must be at least 1.")
    return DatasetSpec(metadata, [SubsetSpec(folder, num_repeats=repeats, metadata_file=metadata,
                                             where="--metadata-file")], {}, {})


def load_dataset_toml(path: str | Path) -> dict[str, Any]:
    """The tables of the dataset config at ``path``, unchecked."""
    path = Path(path)
    if not path.is_file():
        raise DatasetConfigError(f"dataset config '{path}' does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DatasetConfigError(f"dataset config '{path}' is not valid TOML: {exc}") from exc


def read_dataset_config(path: str | Path) -> DatasetSpec:
    """The dataset config at ``path``, every key checked and every subset folder found."""
    return parse_dataset_config(load_dataset_toml(path), Path(path))


def parse_dataset_config(data: dict[str, Any], path: Path) -> DatasetSpec:
    """``data``: the tables of the dataset config at ``path`` (relative image_dir paths are from its folder)."""
    unknown = sorted(set(data) - {"general", "datasets"})
    if unknown:
        raise DatasetConfigError(f"dataset config '{path}': unknown top-level key(s) {unknown}; a dataset config has "
                                 f"[general] and [[datasets]] (with [[datasets.subsets]]).")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"dataset config '{path}' has no [[datasets]] table.")
    level_keys = {**DATASET_KEYS, **SUBSET_KEYS}
    general = _read_level(path, "general.", _table(path, "[general]", data.get("general", {})), level_keys)
    subsets: list[SubsetSpec] = []
    dataset_settings: dict[str, tuple[Any, str, str]] = {}  # key -> (value, target, where it was set)
    bucket_settings: list[dict[str, Any]] = []  # per dataset: PrepareOptions field -> value
    for d, raw_dataset in enumerate(datasets):
        where_d = f"datasets[{d}]."
        dataset = _read_level(path, where_d, _table(path, f"datasets[{d}]", raw_dataset), level_keys, ("subsets",))
        merged = {**general, **dataset}
        bucket_settings.append({target.partition(":")[2]: value for key, (value, target) in merged.items()
                                if key in BUCKET_KEYS})
        for key, (value, target) in merged.items():
            if key not in DATASET_KEYS or key in BUCKET_KEYS:
                continue
            earlier = dataset_settings.get(key)
            if earlier is not None and earlier[0] != value:
                raise DatasetConfigError(
                    f"dataset config '{path}': {where_d}{key} = {value!r} differs from {earlier[2]}{key} = "
                    f"{earlier[0]!r}; one prepared folder has one batch size and one validation split. Give the "
                    f"datasets the same {key}, or prepare each into its own folder.")
            dataset_settings[key] = (value, target, where_d)
        raw_subsets = raw_dataset.get("subsets")
        if not isinstance(raw_subsets, list) or not raw_subsets:
            raise DatasetConfigError(f"dataset config '{path}': datasets[{d}] has no [[datasets.subsets]].")
        kinds = set()
        for s, raw_subset in enumerate(raw_subsets):
            where_s = f"datasets[{d}].subsets[{s}]"
            own = _read_level(path, where_s + ".", _table(path, where_s, raw_subset),
                              {**SUBSET_KEYS, **SUBSET_ONLY_KEYS})
            inherited = {k: v for k, v in merged.items() if k in SUBSET_KEYS}
            if "metadata_file" in own:
                _check_fine_tuning(path, where_d, where_s, own, dataset)
                inherited = {k: v for k, v in inherited.items() if k not in DREAMBOOTH_ONLY_KEYS}  # [general]'s
            kinds.add("metadata_file" in own)
            subsets.append(replace(_subset(path, where_s, {**inherited, **own}), buckets=bucket_settings[d]))
        if len(kinds) > 1:
            raise DatasetConfigError(f"dataset config '{path}': datasets[{d}] mixes subsets with metadata_file "
                                     f"(fine-tuning) and without (image folders with caption files); as in "
                                     f"sd-scripts, put them in separate [[datasets]].")
    prepare = {t.partition(":")[2]: v for v, t, _ in dataset_settings.values() if t.startswith("prepare:")}
    if all(b == bucket_settings[0] for b in bucket_settings):
        # One bucket set: the prepare options themselves, as before datasets could differ.
        prepare.update(bucket_settings[0])
        subsets = [replace(s, buckets={}) for s in subsets]
    training = {t.partition(":")[2]: v for v, t, _ in dataset_settings.values() if t.startswith("training:")}
    return DatasetSpec(path, subsets, prepare, training)
