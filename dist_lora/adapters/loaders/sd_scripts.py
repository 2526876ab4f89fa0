"""kohya sd-scripts' key rules (networks/lora.py ``create_network_from_weights``; LyCORIS' ``lycoris.kohya``
names modules the same way), restated.

The network is rebuilt from the file: one module per ``<name>.lora_down.weight`` whose name is one of the
model's LoRA names, ``lora_unet_`` + the module path (diffusers names for SD 1.x/2.x, SGM names for SDXL:
kohya's own SDXL UNet) inside Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D, and
``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the CLIP attention and MLP projections. The state dict is then
loaded with ``strict=False``: tensors of no module are dropped without a word. A module without alpha gets
alpha = rank (scale 1). networks.lora holds LoRA tensors only; LoHa, LoKr, OFT/BOFT, LoCon's CP core and DoRA
need ``--network_module lycoris.kohya``.
"""

from __future__ import annotations

import re

from dist_lora.adapters.loaders.layouts import ParsedFile, is_split_lokr_conv
from dist_lora.adapters.loaders.names import FamilyNames, ModuleInfo
from dist_lora.adapters.loaders.report import UiReport, dora_notes, label

_UNET_BLOCKS = re.compile(r"(^|\.)(attentions|resnets|downsamplers|upsamplers)\.\d+\.")
_TEXT_MODULES = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
_LYCORIS_PARTS = {"lora_mid.weight", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                  "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                  "diff", "diff_b", "w_norm", "b_norm", "oft_blocks", "rescale"}


def is_kohya_target(info: ModuleInfo) -> bool:
    """Whether sd-scripts' LoRA network has a module for it (its target blocks; not conv_in, conv_out or the
    time embedding)."""
    if info.component == 0:
        return bool(_UNET_BLOCKS.search(info.path))
    return bool(_TEXT_MODULES.search(info.path))


def resolve(parsed: ParsedFile, names: FamilyNames) -> UiReport:
    report = UiReport("kohya")
    lycoris_modules = 0
    for key in parsed.shapes:
        module_part, _, part = key.partition(".")
        info = names.by_kohya(module_part)
        if info is None:
            report.ignored[key] = f"'{module_part}' is not one of sd-scripts' module names for this model"
            continue
        if not is_kohya_target(info):
            report.ignored[key] = f"sd-scripts' LoRA network has no module for {info.label}"
            continue
        if part in _LORA_PARTS:
            report.loaded[key] = label((info.component, info.path))
        elif part in _LYCORIS_PARTS:
            report.loaded[key] = label((info.component, info.path))
            lycoris_modules += part in ("dora_scale", "hada_w1_a", "lokr_w1", "lokr_w1_a", "lora_mid.weight",
                                        "oft_blocks")
        else:
            report.ignored[key] = f"no LoRA or LyCORIS module of sd-scripts holds a '{part}'"
    if lycoris_modules:
        report.notes.append(f"{lycoris_modules} modules are LoHa, LoKr, OFT, BOFT, DoRA or LoCon with a CP core: "
                            f"sd-scripts loads them with --network_module lycoris.kohya (lycoris-lora); networks.lora "
                            f"would leave them out")
    split = [m.spelled for m in parsed.modules.values() if m.target is not None and m.target[0] == 0
             and is_split_lokr_conv(m.parts, names.modules[m.target].shape)]
    if split:
        report.notes.append(f"{len(split)} LoKr convolutions (e.g. {split[0]}) store their second factor as "
                            f"w2_a @ w2_b: lycoris-lora 4.1 infers its split from the shapes, gets it wrong where "
                            f"the input and output factor differently, and then refuses the whole file (--fix "
                            f"writes the factor whole)")
    missing_alpha = sum(1 for m in parsed.modules.values() if "alpha" not in m.parts and m.target is not None)
    if missing_alpha:
        report.notes.append(f"{missing_alpha} modules have no alpha: sd-scripts uses alpha = rank (scale 1), as the "
                            f"other loaders do")
    report.notes.extend(dora_notes(parsed, "kohya"))
    return report
