"""The adaptable modules of each base family's published architecture, in every spelling the loaders use.

Built once per family on the meta device (no weights, no download) from the published configs: the
diffusers UNet and the transformers CLIP text encoders. Each module is known by its place in those models
(component, module path) and by its LDM/SGM name (UNet), which AUTOMATIC1111 and ComfyUI look modules up by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_lora.adapters.kohya import module_key_table, text_encoder_module_path
from dist_lora.errors import DistLoraError
from dist_lora.models.names import UNetLayout, unet_diffusers_to_ldm

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_ARCH = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}

Target = tuple[int, str]  # (component: 0 UNet, 1 and 2 the text encoders; module path in that model)


@dataclass(frozen=True)
class ModuleInfo:
    component: int
    path: str  # diffusers / transformers module path (text encoders: as the model names it)
    shape: tuple[int, ...]  # its weight's shape
    ldm: str | None  # UNet: the LDM/SGM path; text encoders: the path with transformers' ``text_model.`` level

    @property
    def label(self) -> str:
        return f"{COMPONENTS[self.component]}.{self.path}"


@dataclass(frozen=True)
class FamilyNames:
    family: str
    modules: dict[Target, ModuleInfo]  # every Linear and Conv2d of the UNet and the text encoders
    kohya: dict[str, Target]  # the kohya/LyCORIS module key each loader agrees on -> module
    unet_config: Any  # diffusers' FrozenDict (its conversions read attributes)

    def by_kohya(self, key: str) -> ModuleInfo | None:
        target = self.kohya.get(key)
        return self.modules[target] if target else None


def _configs(family: str, base: str | None) -> dict[str, dict[str, object]]:
    """The components' configs: the published architecture of ``family``, or a diffusers folder's."""
    from dist_lora.models.reference import FULL_SIZE

    if base is None:
        return dict(FULL_SIZE[_ARCH[family]])
    folder = Path(base)
    if not (folder / "unet" / "config.json").is_file():
        raise DistLoraError(f"--base '{base}' is not a diffusers folder with unet/config.json.")
    configs = {}
    for component in COMPONENTS:
        path = folder / component / "config.json"
        if path.is_file():
            configs[component] = json.loads(path.read_text())
    return configs


def _text_encoders(configs: dict[str, dict[str, object]]) -> list[nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders: list[nn.Module] = []
    if "text_encoder" in configs:
        encoders.append(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
    if "text_encoder_2" in configs:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    return encoders


@cache
def family_names(family: str, base: str | None = None) -> FamilyNames:
    """The modules of ``family``'s published architecture, or of the diffusers folder ``base`` (its config
    files only) for other UNets."""
    from diffusers import UNet2DConditionModel

    if family not in FAMILIES:
        raise DistLoraError(f"unknown base family '{family}'; expected one of {', '.join(FAMILIES)}.")
    configs = _configs(family, base)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        encoders = _text_encoders(configs)
    layout = UNetLayout.from_config(unet.config)
    modules: dict[Target, ModuleInfo] = {}
    for component, model in enumerate([unet, *encoders]):
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if component == 0:
                try:
                    ldm: str | None = unet_diffusers_to_ldm(path, layout)
                except KeyError:
                    ldm = None
            else:
                ldm = text_encoder_module_path(path)
            modules[(component, path)] = ModuleInfo(component, path, tuple(module.weight.shape), ldm)
    kohya_family = "sdxl" if family == "sdxl" else "sd1"
    kohya = module_key_table(unet, list(encoders), kohya_family)
    return FamilyNames(family, modules, kohya, unet.config)


def underscored(path: str) -> str:
    return path.replace(".", "_")
