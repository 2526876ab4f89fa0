"""Reading any adapter file's keys: which module each names, in which layout, and which tensor it is.

Layouts seen in the wild for SD 1.x/2.x and SDXL:
- kohya / LyCORIS: ``lora_unet_<module>.lora_down.weight`` (``lora_te_``, ``lora_te1_``, ``lora_te2_``), SDXL
  UNet modules in SGM names; variants: SDXL UNet modules in diffusers names (ai-toolkit, some converters),
  SD 1.x UNet modules in LDM names, ``lora_te_`` in an SDXL file or ``lora_te1_`` in an SD 1.x one, and
  ``lora_A`` / ``lora_B`` in place of ``lora_down`` / ``lora_up``;
- SimpleTuner's LyCORIS files: ``lycoris_<diffusers module>.<tensor>``;
- diffusers / peft (``save_lora_weights``): ``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``,
  the scale in the peft config stored as ``lora_adapter_metadata``, DoRA as ``lora_magnitude_vector``;
- diffusers' older attention-processor layout: ``unet.<attention>.processor.to_q_lora.down.weight``;
- peft's own ``save_pretrained`` of a UNet: ``base_model.model.<module>.lora_A.weight``;
- ComfyUI's generic layout: ``diffusion_model.<LDM module>.lora_down.weight``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_lora.adapters.io import open_adapter_file
from dist_lora.adapters.loaders.names import FAMILIES, FamilyNames, Target, family_names, underscored
from dist_lora.errors import DistLoraError

# Tensor names after the module part, in the spelling each layout uses -> the kohya/LyCORIS spelling.
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a",
                "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "oft_blocks",
                "oft_diag", "rescale")
_RENAMED_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                  "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                  "lora_linear_layer.down.weight": "lora_down.weight",
                  "lora_linear_layer.up.weight": "lora_up.weight",
                  "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale"}
_ATTN_PROC = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_DOTTED_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "base_model.model.", "diffusion_model.")
_BASE_VERSIONS = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2"}


@dataclass
class FileModule:
    """One module of the file: the module part as the file spells it, what it names, and its tensors."""

    spelled: str
    layout: str
    target: Target | None
    parts: dict[str, str] = field(default_factory=dict)  # kohya tensor name -> the file's key

    def tensor_keys(self) -> list[str]:
        return list(self.parts.values())


@dataclass
class ParsedFile:
    path: Path
    family: str
    family_source: str  # how the family was found
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    modules: dict[str, FileModule]  # spelled module part -> module
    module_of_key: dict[str, str]  # file key -> spelled module part
    unknown: list[str]  # keys of no layout above
    base: str | None = None  # diffusers folder whose configs define the modules (None: the published ones)

    @property
    def names(self) -> FamilyNames:
        return family_names(self.family, self.base)

    @property
    def peft_config(self) -> dict[str, object]:
        raw = self.metadata.get("lora_adapter_metadata")
        try:
            return dict(json.loads(raw)) if raw else {}
        except ValueError:
            return {}


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version in _BASE_VERSIONS:
        return _BASE_VERSIONS[version]
    architecture = metadata.get("modelspec.architecture", "")
    if "stable-diffusion-xl" in architecture:
        return "sdxl"
    if "stable-diffusion-v2" in architecture:
        return "sd2"
    if "stable-diffusion-v1" in architecture:
        return "sd1"
    return None


def _family_from_keys(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Text encoder prefixes of SDXL, else the cross-attention width its key projections read (768, 1024,
    2048 for SD 1.x, 2.x, SDXL)."""
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in shapes):
        return "sdxl"
    widths = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    for key, shape in shapes.items():
        projection = "attn2" in key and "to_k" in key and re.search(r"(lora_down|lora_A|down)\.weight$", key)
        if projection and len(shape) >= 2 and shape[1] in widths:
            return widths[shape[1]]
    if any(re.match(r"lora_unet_(input|output)_blocks_\d+_1_transformer_blocks_[1-9]", k) for k in shapes):
        return "sdxl"
    return None


def _spellings(names: FamilyNames) -> dict[str, tuple[Target, str]]:
    """Every module part the layouts spell -> (module, layout name)."""
    table: dict[str, tuple[Target, str]] = {}
    sdxl = names.family == "sdxl"
    for target, info in names.modules.items():
        component, path = target
        if component == 0:
            table[f"unet.{path}"] = (target, "diffusers/peft")
            table[f"base_model.model.{path}"] = (target, "peft save_pretrained")
            table[f"lycoris_{underscored(path)}"] = (target, "SimpleTuner lycoris_")
            table[f"lora_unet_{underscored(path)}"] = (target, "kohya prefix, diffusers module names")
            if info.ldm is not None:
                table[f"diffusion_model.{info.ldm}"] = (target, "ComfyUI diffusion_model.")
                table[f"lora_unet_{underscored(info.ldm)}"] = (target, "kohya prefix, LDM module names")
        else:
            prefix = ("text_encoder", "text_encoder_2")[component - 1]
            table[f"{prefix}.{path}"] = (target, "diffusers/peft")
            table[f"{prefix}.{info.ldm}"] = (target, "diffusers/peft")
            if component == 1:
                other = "lora_te_" if sdxl else "lora_te1_"
                table[f"{other}{underscored(str(info.ldm))}"] = (target, f"{other} prefix in an "
                                                                 f"{'SDXL' if sdxl else 'SD 1.x/2.x'} file")
    for key, target in names.kohya.items():
        table[key] = (target, "kohya")
    return table


def _split(key: str, spellings: dict[str, tuple[Target, str]]) -> tuple[str, str] | None:
    """(module part, kohya tensor name) of a key, or None for keys of no known layout."""
    attn = _ATTN_PROC.match(key)
    if attn:
        proj = "to_out.0" if attn["proj"] == "to_out" else attn["proj"]
        return f"{attn['module']}.{proj}", f"lora_{attn['part']}.weight"
    if key.startswith(("lora_", "lycoris_")) and "." in key:
        module, _, part = key.partition(".")
        part = _RENAMED_PARTS.get(part, part)
        return (module, part) if part in _KOHYA_PARTS else None
    if key.startswith(_DOTTED_PREFIXES):
        for spelled in sorted(_RENAMED_PARTS, key=len, reverse=True) + list(_KOHYA_PARTS):
            if key.endswith(f".{spelled}"):
                module = key[: -len(spelled) - 1]
                return module, _RENAMED_PARTS.get(spelled, spelled)
    return None


def parse_adapter_file(path: str | Path, family: str | None = None, base: str | None = None) -> ParsedFile:
    """Group a file's keys into modules and find what each names, for ``family`` (found from the file's
    metadata or its keys when not given). Reads the header and shapes only."""
    path = Path(path)
    metadata, shapes = open_adapter_file(path, shapes_only=True)
    if not shapes:
        raise DistLoraError(f"adapter file '{path}' holds no tensors.")
    if family is not None and family not in FAMILIES:
        raise DistLoraError(f"--family '{family}' is not one of {', '.join(FAMILIES)}.")
    source = "given"
    if family is None:
        family, source = _family_from_metadata(metadata), "metadata"
        if family is None:
            family, source = _family_from_keys(shapes), "key names and shapes"
        if family is None:
            raise DistLoraError(f"adapter file '{path}': cannot tell its base family from its metadata or keys; "
                                f"give --family {'|'.join(FAMILIES)}.")
    spellings = _spellings(family_names(family, base))
    modules: dict[str, FileModule] = {}
    module_of_key: dict[str, str] = {}
    unknown: list[str] = []
    for key in shapes:
        split = _split(key, spellings)
        if split is None:
            unknown.append(key)
            continue
        spelled, part = split
        if spelled not in modules:
            target, layout = spellings.get(spelled, (None, "unknown module"))
            modules[spelled] = FileModule(spelled, layout, target)
        modules[spelled].parts[part] = key
        module_of_key[key] = spelled
    return ParsedFile(path, family, source, metadata, shapes, modules, module_of_key, unknown, base)


def is_split_lokr_conv(parts: Mapping[str, object], weight_shape: tuple[int, ...]) -> bool:
    """A k x k convolution's LoKr second factor stored as ``w2_a @ w2_b`` ([b, r] @ [r, d*k*k]), which
    lycoris-lora (4.1) splits back from the shapes alone and gets wrong where the input and output
    dimensions factor differently (SD 1.5's 1920 -> 640 conv1), refusing the whole file."""
    return len(weight_shape) == 4 and weight_shape[2:] != (1, 1) and "lokr_w2_a" in parts and "lokr_t2" not in parts


def load_tensors(parsed: ParsedFile) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(parsed.path))
