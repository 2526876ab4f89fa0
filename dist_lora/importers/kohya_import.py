"""`dist-lora import-kohya`: a kohya_ss GUI config (JSON) or an sd-scripts ``--config_file`` (TOML) as our
training recipe, the data commands it needs, and a report of what became of every key.

Every key is mapped, reported as without effect here (GUI and launcher settings, values that are off),
or reported as unsupported with the reason; none is dropped silently. Everything is checked before a
file is written.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora.config import config_from_dict, to_toml
from dist_lora.errors import DistLoraError
from dist_lora.importers.kohya_dataset import ImportedDataset, dataset_toml, import_dataset_config, sets_true
from dist_lora.importers.kohya_keys import (
    GUI_NAMES,
    MAPPED,
    NO_EFFECT,
    UNSUPPORTED,
    ImportUnsupported,
    ImportValueError,
    parse_bool,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# kohya_ss GUI LoRA_type -> our network.type.
LORA_TYPES = {"standard": "lora", "kohya locon": "locon", "lycoris/locon": "locon", "lycoris/loha": "loha",
              "lycoris/lokr": "lokr", "lycoris/diag-oft": "oft", "lycoris/boft": "boft"}
LYCORIS_ALGOS = {"locon": "locon", "lora": "locon", "loha": "loha", "lokr": "lokr", "diag-oft": "oft",
                 "boft": "boft"}
# What a kohya_ss GUI preset leaves out (it carries no paths), and the import-kohya flag that supplies each.
SUPPLIED_BY_FLAG = {"train_data_dir": "--train-data-dir", "reg_data_dir": "--reg-data-dir",
                    "pretrained_model_name_or_path": "--pretrained", "output_dir": "--output-dir"}
# Written where a needed value is missing, so that the recipe is complete but for these marks.
PLACEHOLDERS = {"train_data_dir": "<TRAIN_DATA_DIR>", "pretrained_model_name_or_path": "<PRETRAINED_MODEL>"}
_NETWORK_KEYS = {"LoRA_type", "network_module", "network_args", "dora_wd", "algo",
                 "network_train_unet_only", "network_train_text_encoder_only"}


class KohyaImportError(DistLoraError):
    """A kohya config that cannot be imported; the message names the file and the key."""


@dataclass
class ImportReport:
    mapped: list[tuple[str, Any, str]] = field(default_factory=list)  # kohya key, value, our key
    no_effect: list[tuple[str, Any, str]] = field(default_factory=list)  # kohya key, value, why
    unsupported: list[tuple[str, Any, str]] = field(default_factory=list)  # kohya key, value, why

    def text(self) -> str:
        lines = [f"mapped ({len(self.mapped)}):"]
        lines += [f"  {k} = {v!r} -> {ours}" for k, v, ours in self.mapped]
        lines.append(f"no effect here ({len(self.no_effect)}):")
        lines += [f"  {k} = {v!r}: {why}" for k, v, why in self.no_effect]
        lines.append(f"unsupported ({len(self.unsupported)}):")
        lines += [f"  {k} = {v!r}: {why}" for k, v, why in self.unsupported]
        return "\n".join(lines) + "\n"


@dataclass
class KohyaImport:
    raw: dict[str, dict[str, Any]]  # our config, section by section
    commands: list[list[str]]  # dist-lora prepare / cache, in order
    report: ImportReport
    dataset: ImportedDataset | None = None  # the dataset config's copy (dataset.toml), if one was given
    missing: list[str] = field(default_factory=list)  # kohya keys marked with PLACEHOLDERS: the flag fills each

    def missing_lines(self) -> list[str]:
        return [f"{key} is missing: marked {PLACEHOLDERS[key]} in train.toml and prepare.sh; "
                f"import again with {SUPPLIED_BY_FLAG[key]} to fill it" for key in self.missing]


def read_kohya_file(path: Path) -> dict[str, Any]:
    """The file's keys, sd-scripts' TOML sections flattened as sd-scripts reads them."""
    if not path.is_file():
        raise KohyaImportError(f"kohya config '{path}' does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON (kohya_ss GUI)" if path.suffix.lower() == ".json" else "TOML (sd-scripts --config_file)"
        raise KohyaImportError(f"kohya config '{path}' is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise KohyaImportError(f"kohya config '{path}' holds no key/value table.")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # sd-scripts: [model_arguments], [training_arguments], ...
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _is_off(value: Any) -> bool:
    if isinstance(value, str) and value.strip():
        try:
            return float(value) == 0  # the GUI stores many numbers as text: "0"
        except ValueError:
            return False
    return value is None or value is False or value == "" or (not isinstance(value, bool) and value == 0) \
        or value == []


def _network_args(values: Any, path: Path) -> dict[str, str]:
    items = values if isinstance(values, list) else str(values).split()
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise KohyaImportError(f"kohya config '{path}': network_args entry {item!r} is not key=value.")
        out[key.strip()] = value.strip()
    return out


def _network_type(keys: dict[str, Any], args: dict[str, str], path: Path) -> str:
    if "LoRA_type" in keys:
        name = str(keys["LoRA_type"])
        kind = LORA_TYPES.get(name.strip().lower())
        if kind is None:
            raise KohyaImportError(f"kohya config '{path}': LoRA_type {name!r} cannot be trained here; known types: "
                                   f"Standard, Kohya LoCon, LyCORIS/LoCon, LyCORIS/LoHa, LyCORIS/LoKr, "
                                   f"LyCORIS/Diag-OFT, LyCORIS/BOFT.")
    else:
        module = str(keys.get("network_module", "networks.lora"))
        if module == "networks.lora":
            kind = "locon" if "conv_dim" in args else "lora"
        elif module == "lycoris.kohya":
            algo = args.get("algo", "locon").lower()
            if algo not in LYCORIS_ALGOS:
                raise KohyaImportError(f"kohya config '{path}': network_args algo={algo!r} cannot be trained here; "
                                       f"known: {', '.join(LYCORIS_ALGOS)}.")
            kind = LYCORIS_ALGOS[algo]
        elif module == "networks.oft":
            # sd-scripts' own OFT counts blocks per module (network_dim); LyCORIS' diag-oft, which we train,
            # sizes them (dim: the largest block size), so the same number would mean another network.
            raise KohyaImportError(f"kohya config '{path}': network_module 'networks.oft' sets the number of OFT "
                                   f"blocks per module (network_dim); here OFT is LyCORIS' diag-oft, whose dim is "
                                   f"the block size. Use network_module = 'lycoris.kohya' with network_args "
                                   f"algo=diag-oft (dim: block size, constraint = your network_alpha).")
        else:
            raise KohyaImportError(f"kohya config '{path}': network_module {module!r} cannot be trained here; use "
                                   f"networks.lora or lycoris.kohya.")
    dora = str(keys.get("dora_wd", args.get("dora_wd", "false"))).lower() == "true"
    if dora and kind != "locon":
        raise KohyaImportError(f"kohya config '{path}': dora_wd = true is trained here with LoCon-style DoRA only "
                               f"(network.type = 'dora'); the config asks for {kind}.")
    return "dora" if dora else kind


class _Builder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw: dict[str, dict[str, Any]] = {}
        self.prepare: dict[str, Any] = {}
        self.cache: dict[str, bool] = {}
        self.report = ImportReport()
        self.names: dict[str, str] = {}  # sd-scripts name -> the file's own key

    def name(self, key: str) -> str:
        return self.names.get(key, key)

    def set(self, key: str, value: Any, kohya_key: str, original: Any) -> None:
        self._put(key, value)
        self.report.mapped.append((self.name(kohya_key), original, key))

    def _put(self, key: str, value: Any) -> None:
        if key.startswith("prepare:"):
            self.prepare[key.removeprefix("prepare:")] = value
        elif key.startswith("cache:"):
            part = key.removeprefix("cache:")
            self.cache[part] = self.cache.get(part, False) or bool(value)
        else:
            section, name = key.split(".")
            self.raw.setdefault(section, {})[name] = value

    def map_key(self, key: str, value: Any) -> None:
        target = MAPPED[key]
        try:
            converted = target.convert(value)
        except ImportUnsupported as exc:
            self.report.unsupported.append((self.name(key), value, str(exc)))
            if exc.fallback is not None:
                self._put(target.key, exc.fallback)
            return
        except ImportValueError as exc:
            raise KohyaImportError(f"kohya config '{self.path}': {self.name(key)} = {value!r}: {exc}.") from exc
        self.set(target.key, converted, key, value)


def _normalise(keys: dict[str, Any], b: _Builder) -> dict[str, Any]:
    """sd-scripts' names for the GUI's keys (the report keeps the file's own). Where the file holds both
    names of one option (the GUI's ``epoch`` and ``max_train_epochs``), sd-scripts' own name wins."""
    out: dict[str, Any] = {}
    for key, value in keys.items():
        name = "xformers_flag" if key == "xformers" and isinstance(value, bool) else GUI_NAMES.get(key, key)
        if name in out:
            first = b.names[name]
            if key != name and value in ("", None, out[name]):
                b.report.no_effect.append((key, value, f"the same option as {first}"))
                continue
            b.report.no_effect.append((first, out[name], f"overridden by {key} = {value!r}"))
        out[name] = value
        b.names[name] = key
    return out


def _learning_rates(keys: dict[str, Any], b: _Builder) -> None:
    """kohya: unet_lr and text_encoder_lr default to learning_rate; text_encoder_lr 0 trains the UNet alone."""
    base = keys.get("learning_rate")
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        if key in keys and keys[key] in ("", None):
            b.report.no_effect.append((b.name(key), keys[key], "empty"))
    if base not in ("", None):
        b.map_key("learning_rate", base)
    if keys.get("unet_lr") not in ("", None, 0):
        b.map_key("unet_lr", keys["unet_lr"])
    elif "unet_lr" in keys and keys["unet_lr"] == 0:
        b.report.no_effect.append(("unet_lr", 0, "0 means learning_rate"))
    text_lr = keys.get("text_encoder_lr")
    unet_only = bool(keys.get("network_train_unet_only")) or text_lr == 0
    if text_lr not in ("", None, 0):
        b.map_key("text_encoder_lr", text_lr)
    elif base not in ("", None) and not unet_only:
        b.raw.setdefault("optimizer", {})["text_encoder_lr"] = float(base)
    if text_lr == 0:
        b.report.mapped.append(("text_encoder_lr", 0, "network.train_text_encoder = false"))
    b.raw.setdefault("network", {})["train_text_encoder"] = not unet_only


FP8_KEYS = ("fp8_base", "fp8_base_unet")


def _fp8_base(keys: dict[str, Any], b: _Builder) -> None:
    """sd-scripts: fp8_base stores the UNet and the text encoders in fp8, fp8_base_unet the UNet alone."""
    for key in FP8_KEYS:
        if key not in keys:
            continue
        value = keys[key]
        try:
            on = parse_bool(value) if value not in ("", None) else False
        except ImportValueError as exc:
            raise KohyaImportError(f"kohya config '{b.path}': {b.name(key)} = {value!r}: {exc}.") from exc
        if not on:
            b.report.no_effect.append((b.name(key), value, "off"))
            continue
        b.set("model.base_dtype", "fp8", key, value)
        if key == "fp8_base":
            b.set("model.fp8_text_encoders", True, key, value)


def _dataset_config(keys: dict[str, Any], given: str | Path | None, b: _Builder) -> ImportedDataset | None:
    """The dataset config: ``given`` (--dataset-config), else the file's own dataset_config key. sd-scripts
    then ignores train_data_dir and reg_data_dir."""
    own = keys.pop("dataset_config", None)
    if given and not _is_off(own):
        b.report.no_effect.append((b.name("dataset_config"), own, f"--dataset-config {given} is read instead"))
    path = given or (None if _is_off(own) else str(own))
    if path is None:
        if own is not None:
            b.report.no_effect.append((b.name("dataset_config"), own, "empty"))
        return None
    if not given:
        b.report.mapped.append((b.name("dataset_config"), own, "dataset.toml (dist-lora prepare --dataset-config)"))
    dataset = import_dataset_config(path)
    for key in ("train_data_dir", "reg_data_dir", "in_json", "dataset_repeats"):
        if key in keys:
            b.report.no_effect.append((b.name(key), keys.pop(key), "the dataset config's subsets are read instead"))
    if not _is_off(keys.get("caption_extension")):  # sd-scripts: the subsets' fallback
        extension = keys.pop("caption_extension")
        b.set("prepare:--caption-extension", str(extension), "caption_extension", extension)
    return dataset


def _apply_dataset(dataset: ImportedDataset, b: _Builder) -> None:
    """The dataset config's training settings win over the main config's (as in sd-scripts)."""
    for ours, value in dataset.training.items():
        section, name = ours.split(".")
        b.raw.setdefault(section, {})[name] = value
        for entry in [e for e in b.report.mapped if e[2] == ours]:
            b.report.mapped.remove(entry)
            b.report.no_effect.append((entry[0], entry[1], f"the dataset config sets {name} = {value!r}"))
    b.report.mapped += dataset.mapped
    b.report.no_effect += dataset.no_effect
    b.report.unsupported += dataset.unsupported


def _supply(keys: dict[str, Any], supplied: dict[str, str], b: _Builder) -> None:
    """Values given by flag win over the file's (reported), and fill what it leaves out."""
    for key, value in supplied.items():
        if key not in SUPPLIED_BY_FLAG:
            raise ValueError(f"not a key a flag supplies: {key}")
        if not _is_off(keys.get(key)) and str(keys[key]) != value:
            b.report.no_effect.append((f"{key} (in the file)", keys[key], f"{SUPPLIED_BY_FLAG[key]} {value} is used "
                                                                          f"instead"))
        keys[key] = value


def _mark_missing(keys: dict[str, Any], with_dataset: bool) -> list[str]:
    """The needed values the file and the flags leave out, set to their placeholders."""
    missing = []
    if not with_dataset and _is_off(keys.get("train_data_dir")) and _is_off(keys.get("in_json")):
        missing.append("train_data_dir")
    if _is_off(keys.get("pretrained_model_name_or_path")):
        missing.append("pretrained_model_name_or_path")
    for key in missing:
        keys[key] = PLACEHOLDERS[key]
    return missing


def import_kohya_config(path: str | Path, out_dir: str | Path, dataset_config: str | Path | None = None,
                        supplied: dict[str, str] | None = None) -> KohyaImport:
    """Read and map every key, of the dataset config too (nothing is written). ``supplied``: values of
    SUPPLIED_BY_FLAG's keys given on the command line; needed ones still missing are marked."""
    path, out_dir = Path(path), Path(out_dir)
    b = _Builder(path)
    raw_keys = read_kohya_file(path)
    _supply(raw_keys, supplied or {}, b)
    keys = _normalise(raw_keys, b)
    dataset = _dataset_config(keys, dataset_config, b)
    missing = _mark_missing(keys, dataset is not None)
    args = _network_args(keys.get("network_args", []), path)
    b.raw.setdefault("network", {})["type"] = _network_type(keys, args, path)
    for key in sorted(_NETWORK_KEYS & keys.keys()):
        b.report.mapped.append((b.name(key), keys[key], "network.type"))
    for key, value in args.items():  # network_args hold the same options as the GUI's own keys
        name = {"factor": "lokr_factor", "dropout": "network_dropout", "constrain": "constraint"}.get(key, key)
        if name in MAPPED:
            keys.setdefault(name, value)
        elif key == "rescaled":
            keys.setdefault(key, parse_bool(value))
        elif key not in ("algo", "dora_wd"):
            b.report.unsupported.append((f"network_args {key}", value, "no counterpart here"))
    if b.raw["network"]["type"] not in ("oft", "boft"):
        for key in ("constraint", "rescaled"):
            if key in keys:
                b.report.no_effect.append((b.name(key), keys.pop(key), "OFT/BOFT only"))
    if b.raw["network"]["type"] == "lora":
        for key in ("conv_dim", "conv_alpha"):
            if key in keys:
                b.report.no_effect.append((b.name(key), keys.pop(key), "LoRA without convolution layers (LoCon uses "
                                                                       "it)"))
    _learning_rates(keys, b)
    if "lr_warmup_percent" in keys and not _is_off(keys["lr_warmup_percent"]) and keys.get("max_train_steps"):
        steps = int(float(keys.pop("lr_warmup_percent")) / 100 * int(keys["max_train_steps"]))
        b.set("scheduler.warmup_steps", steps, "lr_warmup", steps)
    if "sample_prompts" in keys and not _is_off(keys["sample_prompts"]):
        prompts = str(keys.pop("sample_prompts"))
        if Path(prompts).suffix.lower() in (".txt", ".toml", ".json") and "\n" not in prompts:
            b.set("sample.prompt_file", prompts, "sample_prompts", prompts)
        else:
            lines = [line.strip() for line in prompts.splitlines() if line.strip() and not line.startswith("#")]
            b.set("sample.prompts", lines, "sample_prompts", prompts)
    _fp8_base(keys, b)
    handled = _NETWORK_KEYS | {"learning_rate", "unet_lr", "text_encoder_lr", "sample_prompts", *FP8_KEYS}
    for key, value in keys.items():
        if key in handled:
            continue
        name = b.name(key)
        if key in MAPPED:
            if value in ("", None):
                b.report.no_effect.append((name, value, "empty"))
            else:
                b.map_key(key, value)
        elif key in NO_EFFECT:
            b.report.no_effect.append((name, value, NO_EFFECT[key]))
        elif _is_off(value):
            b.report.no_effect.append((name, value, "off"))
        elif key in UNSUPPORTED:
            b.report.unsupported.append((name, value, UNSUPPORTED[key]))
        else:
            b.report.unsupported.append((name, value, "not a kohya option known here"))
    if dataset is not None:
        _apply_dataset(dataset, b)
        for key in ("color_aug", "random_crop"):
            if b.cache.get("latents") and sets_true(dataset.tables, key):
                raise KohyaImportError(f"dataset config '{dataset_config or keys.get('dataset_config')}' turns {key} "
                                       f"on, which changes the images every epoch, but '{path}' caches latents "
                                       f"(sd-scripts refuses it too); turn cache_latents or {key} off.")
    return KohyaImport(b.raw, _data_commands(b, out_dir, dataset is not None), b.report, dataset, missing)


def _unmap(b: _Builder, target: str, why: str) -> None:
    """Report the key mapped to ``target`` as without effect after all."""
    entry = next(e for e in b.report.mapped if e[2] == target)
    b.report.mapped.remove(entry)
    b.report.no_effect.append((entry[0], entry[1], why))


def _data_commands(b: _Builder, out_dir: Path, with_dataset: bool) -> list[list[str]]:
    """`dist-lora prepare` for the training folder or the dataset config's copy (whose settings win over
    the options given here), `dist-lora cache` when kohya cached latents; the recipe reads what the last
    one writes."""
    src = b.prepare.pop("src", None)
    shards = out_dir / "shards"
    # sd-scripts: in_json makes a fine-tuning dataset (train_data_dir holds its images), which ignores
    # reg_data_dir; dataset_repeats counts for such a dataset only.
    if "--metadata-file" in b.prepare and "--reg" in b.prepare:
        b.prepare.pop("--reg")
        _unmap(b, "prepare:--reg", "in_json makes a fine-tuning dataset, which sd-scripts reads no regularization "
                                   "images for")
    if "--metadata-file" not in b.prepare and "--repeats" in b.prepare:
        b.prepare.pop("--repeats")
        _unmap(b, "prepare:--repeats", "it counts for in_json datasets only; a folder's repeats are in its name")
    if with_dataset:
        prepare = ["dist-lora", "prepare", str(shards), "--dataset-config", str(out_dir / "dataset.toml")]
    elif src or "--metadata-file" in b.prepare:
        prepare = ["dist-lora", "prepare", *([str(src)] if src else []), str(shards)]
    else:
        raise KohyaImportError(f"kohya config '{b.path}' names no train_data_dir and no dataset_config: give the "
                               f"training images' folder (kohya's <repeats>_<name> layout) or a dataset config "
                               f"(--dataset-config).")
    if not b.prepare.pop("buckets", True):
        prepare.append("--no-buckets")
        if b.prepare.pop("--bucket-no-upscale", False):  # sd-scripts ignores it without buckets
            _unmap(b, "prepare:--bucket-no-upscale", "enable_bucket is off, and sd-scripts ignores it then")
    for flag in ("--bucket-no-upscale", "--random-crop", "--alpha-mask", "--enable-wildcard"):
        if b.prepare.pop(flag, False):
            prepare.append(flag)
    for option, value in sorted(b.prepare.items()):
        prepare += [option, str(value)]
    commands = [prepare]
    data = b.raw.setdefault("data", {})
    data["shards"] = str(shards)
    if b.cache.get("latents"):
        for key, on in (("color_aug", data.get("color_aug")), ("random_crop", "--random-crop" in prepare)):
            if on:
                raise KohyaImportError(f"kohya config '{b.path}': {key} changes the images every epoch, so their "
                                       f"latents cannot be cached (sd-scripts refuses it too); turn cache_latents or "
                                       f"{key} off.")
        model = b.raw.get("model", {}).get("pretrained", "")
        cached = out_dir / "cached"
        cache = ["dist-lora", "cache", str(shards), str(cached), "--model", str(model)]
        if not b.cache.get("text"):
            cache.append("--no-text")
        if data.get("flip_aug"):
            cache.append("--flip-aug")
        model_section = b.raw.get("model", {})
        cache += ["--clip-skip", str(model_section.get("clip_skip", 1)),
                  "--max-token-length", str(model_section.get("max_token_length", 75))]
        commands.append(cache)
        data["shards"] = str(cached)
    return commands


def write_import(result: KohyaImport, out_dir: str | Path, source: Path) -> list[Path]:
    """train.toml, prepare.sh and import_report.txt in ``out_dir`` (new or empty), all or none."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KohyaImportError(f"output folder '{out_dir}' is not empty; choose a new folder.")
    try:
        config = config_from_dict(result.raw)
    except DistLoraError as exc:
        raise KohyaImportError(f"kohya config '{source}' maps to a recipe that does not validate: {exc}") from exc
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    (staging / "train.toml").write_text(f"# imported from {source}\n" + to_toml(config), encoding="utf-8")
    script = ["#!/usr/bin/env bash", f"# data commands for {source}", "set -euo pipefail"]
    if result.missing:
        # Stops before any command runs; delete these lines once the marks are filled in by hand.
        script += [f"# {line}" for line in result.missing_lines()]
        needed = ", ".join(f"{SUPPLIED_BY_FLAG[k]} ({k})" for k in result.missing)
        message = (f"prepare.sh: values still missing: {needed}; import again with them, or fill the marks in "
                   f"train.toml and here and delete these lines")
        script.append(f"echo {shlex.quote(message)} >&2")
        script.append("exit 2")
    script += [" ".join(shlex.quote(part) for part in command) for command in result.commands]
    script.append(f"dist-lora train --config {shlex.quote(str(out_dir / 'train.toml'))}")
    (staging / "prepare.sh").write_text("\n".join(script) + "\n", encoding="utf-8")
    (staging / "import_report.txt").write_text(f"# {source}\n" + result.report.text(), encoding="utf-8")
    if result.dataset is not None:
        (staging / "dataset.toml").write_text(dataset_toml(result.dataset.tables, source), encoding="utf-8")
    if out_dir.exists():
        out_dir.rmdir()
    shutil.move(str(staging), str(out_dir))
    return [out_dir / name for name in ("train.toml", "prepare.sh", "import_report.txt")]
