"""Reading adapter files (ours, kohya's, LyCORIS') and putting them back onto a model."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from dist_lora.adapters.inject import adapter_layers, add_network
from dist_lora.adapters.kohya import BASE_MODEL_VERSION, module_key_table
from dist_lora.adapters.oft_layer import out_channels
from dist_lora.adapters.orthogonal import check_blocks
from dist_lora.adapters.targets import ModuleRank, TargetPlan
from dist_lora.adapters.tensors import KNOWN_SUFFIXES, ModuleAdapter, is_input_axis_scale, kind_of, write_adapter
from dist_lora.errors import DistLoraError

_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_FAMILY_OF_VERSION = {v: k.removesuffix("_v") for k, v in BASE_MODEL_VERSION.items()}


class AdapterFileError(DistLoraError):
    """An adapter file that cannot be read or does not fit the model; the message names the file."""


@dataclass
class AdapterFile:
    path: Path
    modules: dict[str, ModuleAdapter]  # kohya module key -> adapter
    metadata: dict[str, str]

    @property
    def base_family(self) -> str | None:
        return _FAMILY_OF_VERSION.get(self.metadata.get("ss_base_model_version", ""))


def open_adapter_file(path: Path, *, shapes_only: bool = False) -> tuple[dict[str, str], dict[str, Any]]:
    """An adapter .safetensors file's metadata and tensors (with ``shapes_only``, their shapes: the header
    alone is read); ``AdapterFileError`` naming the file when it is missing or damaged."""
    if not path.is_file():
        raise AdapterFileError(f"adapter file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if shapes_only:
                return metadata, {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
            return metadata, {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterFileError(f"adapter file '{path}' is not a readable .safetensors file: {exc}") from exc


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Load and check every key; raise ``AdapterFileError`` naming the file and the first bad keys."""
    path = Path(path)
    metadata, tensors = open_adapter_file(path)
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        module, _, suffix = key.partition(".")
        if not module.startswith(_PREFIXES) or suffix not in KNOWN_SUFFIXES:
            unknown.append(key)
            continue
        grouped[module][suffix] = tensor
    if unknown:
        raise AdapterFileError(f"adapter file '{path}' has keys of unknown families (expected kohya/LyCORIS keys "
                               f"like lora_unet_*.lora_down.weight or *.hada_w1_a): {sorted(unknown)[:3]}")
    if not grouped:
        raise AdapterFileError(f"adapter file '{path}' holds no adapter tensors.")
    modules = {}
    for module, parts in grouped.items():
        alpha = parts.pop("alpha", None)
        try:
            kind = kind_of(parts)
        except DistLoraError as exc:
            raise AdapterFileError(f"adapter file '{path}': module '{module}': {exc}") from exc
        adapter = ModuleAdapter(kind, parts, 0.0)
        # A missing alpha means scale 1 (as A1111 and ComfyUI read it).
        adapter.alpha = float(alpha.float().item()) if alpha is not None else float(adapter.rank or 1)
        modules[module] = adapter
    return AdapterFile(path, modules, metadata)


def _injection_groups(adapters: dict[str, ModuleAdapter]) -> dict[tuple[str, bool, str], dict[str, ModuleAdapter]]:
    groups: dict[tuple[str, bool, str], dict[str, ModuleAdapter]] = defaultdict(dict)
    for path, adapter in adapters.items():
        kind = "dora" if adapter.is_dora else adapter.kind
        tucker = "hada_t1" in adapter.tensors or "lokr_t2" in adapter.tensors
        axis = "input" if adapter.is_dora and is_input_axis_scale(adapter.tensors["dora_scale"]) else "output"
        groups[(kind, tucker, axis)][path] = adapter
    return groups


def apply_adapters(model: nn.Module, adapters: dict[str, ModuleAdapter]) -> int:
    """Inject peft layers of the right type into the named modules and load the tensors into them."""
    for (kind, tucker, axis), group in _injection_groups(adapters).items():
        plan = TargetPlan({p: ModuleRank(a.rank or 1, a.alpha) for p, a in group.items()})
        if not _already_adapted(model, group):
            add_network(model, kind, plan, tucker=tucker, dora_axis=axis)
    layers = dict(adapter_layers(model))
    for path, adapter in adapters.items():
        write_adapter(layers[path], adapter)
    return len(adapters)


def _already_adapted(model: nn.Module, group: dict[str, ModuleAdapter]) -> bool:
    adapted = {p for p, _ in adapter_layers(model)}
    return all(p in adapted for p in group)


def apply_adapter_file(path: str | Path, unet: nn.Module, text_encoders: list[nn.Module],
                       family: str) -> dict[int, int]:
    """Put the file's adapters on the model; return adapted-module counts per component (0: UNet)."""
    adapter_file = read_adapter_file(path)
    if adapter_file.base_family and adapter_file.base_family != family:
        raise AdapterFileError(f"adapter file '{path}' was trained for {adapter_file.base_family} "
                               f"(ss_base_model_version={adapter_file.metadata['ss_base_model_version']}); the model "
                               f"is {family}.")
    table = module_key_table(unet, list(text_encoders), family)
    unmatched = sorted(k for k in adapter_file.modules if k not in table)
    if unmatched:
        raise AdapterFileError(f"adapter file '{path}' does not fit this {family} model: {len(unmatched)} module keys "
                               f"name no module of it, e.g. {unmatched[:3]} (an adapter for another architecture?).")
    per_component: dict[int, dict[str, ModuleAdapter]] = defaultdict(dict)
    models = [unet, *text_encoders]
    for key, adapter in adapter_file.modules.items():
        component, module_path = table[key]
        if adapter.rotates:
            module = models[component].get_submodule(module_path)
            problem = check_blocks(adapter.tensors["oft_blocks"], out_channels(module))
            if problem:
                raise AdapterFileError(f"adapter file '{path}': module '{key}': {problem}.")
        per_component[component][module_path] = adapter
    return {c: apply_adapters(models[c], adapters) for c, adapters in per_component.items()}
