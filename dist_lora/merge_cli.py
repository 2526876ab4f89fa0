"""`dist-lora merge`: bake adapters (each at a weight) into a base model and save it."""

from __future__ import annotations

from pathlib import Path

from dist_lora.adapters.io import AdapterFileError, read_adapter_file
from dist_lora.adapters.kohya import SAVE_DTYPES
from dist_lora.errors import DistLoraError
from dist_lora.models.load import inspect_model_source, load_pipeline, pipeline_text_encoders
from dist_lora.utils.files import check_writable_dir


def parse_weighted(spec: str) -> tuple[str, float]:
    """``file.safetensors:0.8`` -> (file, 0.8); no weight means 1."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError as exc:
        raise DistLoraError(f"--lora '{spec}': the weight after ':' must be a number, e.g. style.safetensors:0.8") \
            from exc


def merge_command(base: str, loras: list[str], out: str, *, config_dir: str = "", save_precision: str = "fp16",
                  overwrite: bool = False) -> Path:
    """Check everything first (files readable, families agree, output free), then load, merge, save."""
    weighted = [parse_weighted(s) for s in loras]
    source = inspect_model_source(base, config_dir)
    for path, _ in weighted:
        adapter = read_adapter_file(path)
        if source.family and adapter.base_family and adapter.base_family != source.family:
            raise AdapterFileError(f"adapter file '{path}' was trained for {adapter.base_family}; '{base}' is "
                                   f"{source.family}.")
    target = Path(out)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output '{target}' already exists; choose another path or pass --overwrite.")
    check_writable_dir(target.parent if target.suffix == ".safetensors" else target)

    from dist_lora.adapters.merge import merge_files
    from dist_lora.models.single_file import save_single_file

    pipe, family = load_pipeline(base, config_dir)
    counts = merge_files(pipe.unet, pipeline_text_encoders(pipe, family), family, weighted)
    for (path, weight), count in zip(weighted, counts, strict=True):
        print(f"merged {path} at {weight:g} into {count} modules")
    if target.suffix == ".safetensors":
        save_single_file(pipe, target, SAVE_DTYPES[save_precision])
    else:
        pipe.to(dtype=SAVE_DTYPES[save_precision])
        pipe.save_pretrained(target, safe_serialization=True)
    return target
