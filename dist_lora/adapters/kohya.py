"""Kohya-format LoRA files: the key layout and metadata that A1111/Forge, ComfyUI, kohya and diffusers read.

Keys: ``<prefix>_<module path with . -> _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
SD 1.x/2.x UNet paths use diffusers names; SDXL UNet paths use the original SGM names, as kohya
writes them. Text encoders use transformers' CLIP names (``text_model.encoder.layers...``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from torch import nn

from dist_lora.adapters.tensors import read_adapters, share_rotation_bound
from dist_lora.models.names import UNetLayout, kohya_module_key, unet_diffusers_to_ldm
from dist_lora.utils.files import atomic_path

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MODELSPEC_IMPLEMENTATION_SDXL = "https://github.com/Stability-AI/generative-models"
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2_v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2_v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def text_encoder_module_path(path: str) -> str:
    """transformers >= 5.6 dropped the ``text_model.`` level of ``CLIPTextModel``; kohya keys keep it."""
    return path if path.startswith(("text_model.", "text_projection")) else f"text_model.{path}"


def text_encoder_prefixes(family: str) -> list[str]:
    return ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]


def module_key_table(unet: nn.Module, text_encoders: list[nn.Module | None], family: str) -> dict[str, tuple[int, str]]:
    """kohya module key -> (component, module path): component 0 is the UNet, i the i-th text encoder.

    Built from ``named_modules()`` (keys cannot be split back on ``_``); SDXL UNet paths are spelled
    in SGM names, as kohya writes them.
    """
    table: dict[str, tuple[int, str]] = {}
    layout = UNetLayout.from_config(unet.config) if family == "sdxl" else None  # type: ignore[attr-defined]
    for path in _base_module_paths(unet, (nn.Linear, nn.Conv2d)):
        try:
            spelled = unet_diffusers_to_ldm(path, layout) if layout else path
        except KeyError:
            continue
        table[kohya_module_key("lora_unet", spelled)] = (0, path)
    for index, (prefix, encoder) in enumerate(zip(text_encoder_prefixes(family), text_encoders, strict=False), 1):
        if encoder is not None:
            for path in _base_module_paths(encoder, (nn.Linear,)):
                table[kohya_module_key(prefix, text_encoder_module_path(path))] = (index, path)
    return table


def _base_module_paths(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """Paths of the model's own layers of ``types``, seen through any peft wrapping."""
    paths = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, types) or ".default" in path or ".lora_" in path:
            continue  # peft's own sub-layers (lora_A.default, ...)
        paths.append(path.removesuffix(".base_layer"))
    return paths


def kohya_tensors(unet: nn.Module, text_encoders: list[nn.Module], family: str) -> dict[str, torch.Tensor]:
    """All adapter tensors of the UNet and the text encoders under kohya/LyCORIS keys, in fp32."""
    inverse = {v: k for k, v in module_key_table(unet, list(text_encoders), family).items()}
    adapters = {inverse[(component, path)]: adapter for component, model in enumerate([unet, *text_encoders])
                for path, adapter in read_adapters(model).items()}
    share_rotation_bound(adapters.values())
    out: dict[str, torch.Tensor] = {}
    for key, adapter in adapters.items():
        for suffix, tensor in adapter.tensors.items():
            out[f"{key}.{suffix}"] = tensor.float().contiguous()
        out[f"{key}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return out


def _data_section(serialized: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", serialized[:8])
    return serialized[8 + header_len:]


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` (sha256 of the tensor bytes after the header) and ``sshs_legacy_hash`` (first 8
    hex digits of the sha256 of 64 KiB at offset 1 MiB), as kohya's precalculate_safetensors_hashes computes
    them for the A1111 additional-networks extension: over the tensors serialized with the ``ss_*`` metadata
    alone (the header's length moves the bytes the legacy hash reads)."""
    serialized = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(_data_section(serialized)).hexdigest()
    legacy = hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


@dataclass
class ExportInfo:
    family: str
    prediction_type: str
    output_name: str
    rank: int
    alpha: float
    resolution: int
    tag_frequency: dict[str, dict[str, int]]
    training: dict[str, str]  # network and training ss_* fields (strings); they win over the defaults


def model_version_key(family: str, prediction_type: str) -> str:
    return "sd2_v" if family == "sd2" and prediction_type == "v_prediction" else family


def build_metadata(info: ExportInfo, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    version = model_version_key(info.family, info.prediction_type)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": str(info.alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[version],
        "ss_v2": str(info.family == "sd2"),
        "ss_output_name": info.output_name,
        "ss_tag_frequency": json.dumps(info.tag_frequency, ensure_ascii=False),
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[version],
        # kohya's values for a LoRA: SDXL's reference code, else diffusers.
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION_SDXL if info.family == "sdxl" else "diffusers",
        "modelspec.implementation_version": f"dist_lora/{package_version('dist_lora')}",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
        **info.training,
    }
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    return meta


def save_kohya_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], info: ExportInfo,
                    save_precision: str = "fp16") -> Path:
    """Cast to the save precision, compute hashes over the final bytes, write atomically."""
    dtype = SAVE_DTYPES[save_precision]
    cast = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    if not all(torch.isfinite(v.float()).all() for v in cast.values()):
        bad = [k for k, v in cast.items() if not torch.isfinite(v.float()).all()][:3]
        raise ValueError(f"refusing to write '{path}': non-finite values in {bad} (overflow in {save_precision}?)")
    metadata = build_metadata(info, cast)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(cast, str(tmp), metadata=metadata)
    return path
