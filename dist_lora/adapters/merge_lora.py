"""`dist-lora merge-lora`: several adapter files, each at a weight (and per-block weights), as one LoRA.

Each file's module change ``delta_i`` (module_delta: scale included, any type) enters as
``w_i * b_i(block) * delta_i``.
- ``concat``: exact. A LoRA/LoCon module contributes its own factors (up scaled by w_i b_i s_i), a
  LoHa/LoKr module those of its full-rank SVD; ranks add up, alpha = the summed rank (scale 1).
- ``svd``: kohya's svd_merge_lora. The weighted sum is decomposed and truncated at ``--rank``
  (``--conv-rank`` for k x k convolutions), alpha = rank; ``--clamp-quantile`` clamps the factors'
  values at that quantile as kohya does (always, at 0.99; off here unless asked, so the file is the best
  rank-r approximation).
DoRA files are refused: a magnitude normalises its own file's direction and does not add.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_lora.adapters.block_weights import block_weight, parse_block_weights
from dist_lora.adapters.delta import module_delta, needs_shape, refuse_rotations, weight_shapes
from dist_lora.adapters.io import AdapterFile, AdapterFileError, read_adapter_file
from dist_lora.adapters.kohya import SAVE_DTYPES
from dist_lora.adapters.resize import file_family, is_spatial, lora_tensors, write_lora
from dist_lora.errors import DistLoraError

MODES = ("concat", "svd")
_RANK_TOLERANCE = 1e-6  # singular values below this share of the largest are dropped when concatenating


@dataclass(frozen=True)
class MergeInput:
    path: Path
    weight: float
    block_weights: str | None = None  # the --lbws text for this file


@dataclass(frozen=True)
class MergeOptions:
    mode: str = "svd"
    rank: int = 0
    conv_rank: int = 0
    clamp_quantile: float = 1.0
    save_precision: str = "fp16"
    base: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise DistLoraError(f"--mode '{self.mode}' is not one of {', '.join(MODES)}.")
        if self.mode == "svd" and self.rank < 1:
            raise DistLoraError("--mode svd needs --rank (a whole number >= 1): the merged file's rank.")
        if self.mode == "concat" and (self.rank or self.conv_rank):
            raise DistLoraError("--mode concat keeps every file's rank (they add up); --rank and --conv-rank "
                                "are for --mode svd.")
        if not 0.5 < self.clamp_quantile <= 1.0:
            raise DistLoraError(f"--clamp-quantile {self.clamp_quantile}: give a quantile in (0.5, 1] "
                                f"(kohya clamps at 0.99; 1 clamps nothing).")
        if self.save_precision not in SAVE_DTYPES:
            raise DistLoraError(f"--save-precision '{self.save_precision}' is not one of {', '.join(SAVE_DTYPES)}.")


def _version(adapter_file: AdapterFile) -> str:
    return adapter_file.metadata.get("ss_base_model_version", "")


def _check_families(files: list[AdapterFile]) -> str:
    families = {file_family(list(f.modules), f.metadata) for f in files}
    versions = {_version(f) for f in files} - {""}
    if len(families) > 1 or len(versions) > 1:
        named = ", ".join(f"'{f.path}' ({_version(f) or file_family(list(f.modules), f.metadata)})" for f in files)
        raise AdapterFileError(f"these files are for different base models and cannot be merged: {named}.")
    for f in files:
        refuse_rotations(f.path, f.modules, "merged into a LoRA")
        dora = [k for k, a in f.modules.items() if a.is_dora]
        if dora:
            raise AdapterFileError(f"adapter file '{f.path}' is DoRA (module '{dora[0]}' has a dora_scale): a DoRA "
                                   f"magnitude normalises its own file's direction, so DoRA files do not merge "
                                   f"into a LoRA.")
    return families.pop()


def _weighted_delta(key: str, source: MergeInput, adapter_file: AdapterFile, family: str,
                    shapes: dict[str, tuple[int, ...]], weights: list[float] | None) -> torch.Tensor:
    adapter = adapter_file.modules[key]
    if needs_shape(key, adapter) and key not in shapes:
        raise AdapterFileError(f"adapter file '{source.path}': module '{key}' stores a convolution's factors "
                               f"flattened and the UNet has no such module to give its shape; pass --base.")
    try:
        delta = module_delta(adapter, shapes.get(key)).double()
    except DistLoraError as exc:
        raise AdapterFileError(f"adapter file '{source.path}': module '{key}': {exc}") from exc
    return delta * (source.weight * block_weight(key, family, weights))


def _concat(key: str, parts: list[tuple[torch.Tensor, MergeInput, AdapterFile, float]]) -> dict[str, torch.Tensor]:
    ups, downs, shape = [], [], None
    for delta, _, adapter_file, factor in parts:
        adapter = adapter_file.modules[key]
        shape = tuple(delta.shape)
        if adapter.kind == "lora":
            up = adapter.tensors["lora_up.weight"].double().flatten(1) * (factor * adapter.scale)
            down = adapter.tensors["lora_down.weight"].double().flatten(1)
        else:  # its exact factors: the SVD at the change's numerical rank
            u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
            keep = max(1, int((s > s[0] * _RANK_TOLERANCE).sum())) if float(s[0]) > 0 else 1
            up, down = u[:, :keep] * s[:keep], vh[:keep]
        ups.append(up)
        downs.append(down)
    assert shape is not None
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    rank = down.shape[0]
    spatial = [1, 1] if len(shape) == 4 else []
    return {"lora_down.weight": down.reshape(rank, *shape[1:]).float().contiguous(),
            "lora_up.weight": up.reshape(shape[0], rank, *spatial).float().contiguous(),
            "alpha": torch.tensor(float(rank))}


def _svd(total: torch.Tensor, options: MergeOptions) -> dict[str, torch.Tensor]:
    shape = tuple(total.shape)
    u, s, vh = torch.linalg.svd(total.flatten(1), full_matrices=False)
    wanted = (options.conv_rank or options.rank) if is_spatial(shape) else options.rank
    rank = max(1, min(wanted, s.numel()))
    tensors = lora_tensors(u, s, vh, rank, shape)
    if options.clamp_quantile < 1.0:
        values = torch.cat([tensors["lora_up.weight"].flatten(), tensors["lora_down.weight"].flatten()])
        high = float(torch.quantile(values.float(), options.clamp_quantile))
        for name in ("lora_up.weight", "lora_down.weight"):
            tensors[name] = tensors[name].clamp(-high, high)
    return tensors


def merge_lora_files(inputs: list[MergeInput], target: str | Path, options: MergeOptions) -> dict[str, int]:
    """Check everything first (options, every file, families, block weights, the output), then merge and
    write atomically. Returns the rank of each written module."""
    options.check()
    target = Path(target)
    if len(inputs) < 2:
        raise DistLoraError("merge-lora needs at least two adapter files (FILE[:WEIGHT] ...).")
    if target.suffix != ".safetensors":
        raise DistLoraError(f"--out '{target}' must end in .safetensors.")
    if target.exists() and not options.overwrite:
        raise FileExistsError(f"output '{target}' already exists; choose another path or pass --overwrite.")
    files = [read_adapter_file(source.path) for source in inputs]
    if any(Path(source.path).resolve() == target.resolve() for source in inputs):
        raise DistLoraError(f"--out '{target}' is one of the inputs; write the merged file elsewhere.")
    family = _check_families(files)
    weights = [parse_block_weights(s.block_weights, family, f"--lbws for '{s.path}'") if s.block_weights else None
               for s in inputs]
    shapes: dict[str, tuple[int, ...]] = {}
    if options.base is not None or any(needs_shape(k, a) for f in files for k, a in f.modules.items()):
        shapes = weight_shapes(options.base, family)
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for key in sorted({k for f in files for k in f.modules}):
        parts = []
        for source, adapter_file, block in zip(inputs, files, weights, strict=True):
            if key in adapter_file.modules:
                delta = _weighted_delta(key, source, adapter_file, family, shapes, block)
                parts.append((delta, source, adapter_file, source.weight * block_weight(key, family, block)))
        shapes_seen = {tuple(p[0].shape) for p in parts}
        if len(shapes_seen) > 1:
            raise AdapterFileError(f"module '{key}' has different shapes in the files ({sorted(shapes_seen)}): they "
                                   f"are not for the same base model.")
        module = _concat(key, parts) if options.mode == "concat" else _svd(sum(p[0] for p in parts), options)
        tensors.update({f"{key}.{suffix}": value for suffix, value in module.items()})
        ranks[key] = int(module["lora_down.weight"].shape[0])
    write_lora(target, tensors, _metadata(inputs, files, options, ranks), options.save_precision)
    return ranks


def _metadata(inputs: list[MergeInput], files: list[AdapterFile], options: MergeOptions,
              ranks: dict[str, int]) -> dict[str, str]:
    first = files[0].metadata
    meta = {k: first[k] for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture",
                                  "modelspec.implementation", "modelspec.prediction_type",
                                  "modelspec.resolution", "ss_resolution") if k in first}
    values = set(ranks.values())
    dim = str(values.pop()) if len(values) == 1 else "Dynamic"
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
                 "modelspec.sai_model_spec": "1.0.1", "modelspec.title": Path(inputs[0].path).stem + "_merged",
                 "ss_training_comment": f"merged by dist-lora merge-lora --mode {options.mode}"})
    if options.mode == "svd" and options.conv_rank and options.conv_rank != options.rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": options.conv_rank, "conv_alpha": options.conv_rank})
    meta["dist_lora_merged_from"] = json.dumps([
        {"file": Path(s.path).name, "weight": s.weight, "lbws": s.block_weights,
         "sshs_model_hash": f.metadata.get("sshs_model_hash", "")} for s, f in zip(inputs, files, strict=True)])
    return meta
