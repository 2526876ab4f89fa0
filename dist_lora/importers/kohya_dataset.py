"""An sd-scripts dataset config, imported: every key reported, the ones with a counterpart kept in a copy
that `dist-lora prepare --dataset-config` reads, the training settings moved to the training recipe.

The copy names every image folder by its absolute path, so it works from the import's output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora.config import toml_value
from dist_lora.data.dataset_config import (
    DATASET_KEYS,
    SUBSET_KEYS,
    SUBSET_ONLY_KEYS,
    DatasetConfigError,
    UnsupportedKey,
    load_dataset_toml,
    parse_dataset_config,
)

_TRAINING_KEYS = {"batch_size": "training.batch_size", "prior_loss_weight": "training.prior_loss_weight"}


@dataclass
class ImportedDataset:
    tables: dict[str, Any]  # the copy: [general] and [[datasets]] with what prepare reads
    training: dict[str, Any] = field(default_factory=dict)  # our training keys ("training.batch_size") -> value
    mapped: list[tuple[str, Any, str]] = field(default_factory=list)  # key, value, where it went
    no_effect: list[tuple[str, Any, str]] = field(default_factory=list)
    unsupported: list[tuple[str, Any, str]] = field(default_factory=list)


def _level(path: Path, where: str, table: Any, allowed: dict[str, Any], result: ImportedDataset,
           skip: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"dataset config '{path}': {where.rstrip('.')} must be a table.")
    kept: dict[str, Any] = {}
    for key, value in table.items():
        name = f"dataset {where}{key}"
        if key in skip:
            continue
        if key not in allowed:
            result.unsupported.append((name, value, "not a dataset config key known here"))
            continue
        checker, target = allowed[key]
        try:
            checked = checker(value)
        except UnsupportedKey as exc:
            result.unsupported.append((name, value, str(exc)))
            continue
        except ValueError as exc:
            raise DatasetConfigError(f"dataset config '{path}': {where}{key} = {value!r}: {exc}.") from exc
        if key in _TRAINING_KEYS:
            result.training[_TRAINING_KEYS[key]] = checked  # one value: parse_dataset_config checks they agree
            result.mapped.append((name, value, _TRAINING_KEYS[key]))
        elif target == "none":
            result.no_effect.append((name, value, "no effect on training here"))
        else:
            if key in ("image_dir", "metadata_file", "conditioning_data_dir"):  # the checked copy lives elsewhere
                folder = Path(checked).expanduser()
                checked = str(folder if folder.is_absolute() else (path.parent / folder).resolve())
            kept[key] = checked
            result.mapped.append((name, value, "dataset.toml (dist-lora prepare --dataset-config)"))
    return kept


def import_dataset_config(path: str | Path) -> ImportedDataset:
    """Read, report and check (subset folders included) the dataset config at ``path``; nothing is written."""
    path = Path(path)
    data = load_dataset_toml(path)
    result = ImportedDataset({})
    for key in sorted(set(data) - {"general", "datasets"}):
        result.unsupported.append((f"dataset {key}", data[key], "not a dataset config table known here"))
    level_keys = {**DATASET_KEYS, **SUBSET_KEYS}
    general = _level(path, "general.", data.get("general", {}), level_keys, result)
    datasets = []
    for d, dataset in enumerate(data.get("datasets") or []):
        kept = _level(path, f"datasets[{d}].", dataset, level_keys, result, ("subsets",))
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        kept["subsets"] = [_level(path, f"datasets[{d}].subsets[{s}].", subset, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS},
                                  result) for s, subset in enumerate(subsets or [])]
        datasets.append(kept)
    result.tables = {"general": general, "datasets": datasets}
    parse_dataset_config(result.tables, path)  # the checks prepare makes: subset folders, agreeing datasets
    return result


def dataset_toml(tables: dict[str, Any], source: Path) -> str:
    """The copy as TOML."""
    lines = [f"# imported from {source}", "[general]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in tables["general"].items()]
    for dataset in tables["datasets"]:
        lines += ["", "[[datasets]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in dataset.items() if key != "subsets"]
        for subset in dataset["subsets"]:
            lines += ["", "  [[datasets.subsets]]"]
            lines += [f"  {key} = {toml_value(value)}" for key, value in subset.items()]
    return "\n".join(lines) + "\n"


def sets_true(tables: dict[str, Any], key: str) -> bool:
    """Whether any level of the copy turns ``key`` on."""
    levels = [tables["general"], *tables["datasets"], *(s for d in tables["datasets"] for s in d["subsets"])]
    return any(level.get(key) is True for level in levels)
