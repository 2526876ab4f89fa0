"""AUTOMATIC1111's key rules (v1.10, extensions-builtin/Lora/networks.py), restated.

For each key: split at the first ``.`` into module part and tensor name; convert a diffusers-named kohya
module part to its LDM (compvis) name (``convert_diffusers_name_to_compvis``, written for two layers per
block); look the result up among the model's module names (``diffusion_model_...`` for the UNet,
``transformer_text_model_...`` / ``0_transformer_...`` for CLIP-L, ``model_transformer_resblocks_...`` /
``1_model_...`` for OpenCLIP, whose q/k/v share one attention module); failing that, replace ``lora_unet``
by ``diffusion_model`` (SGM-named SDXL keys) or ``lora_te1_text_model`` by the CLIP-L prefix. Keys that
match nothing are dropped with a debug log only. The tensors of each matched module must be accepted by
one of its module types, else loading the file raises.
"""

from __future__ import annotations

import re

from dist_lora.adapters.loaders.layouts import ParsedFile
from dist_lora.adapters.loaders.names import FamilyNames, Target, underscored
from dist_lora.adapters.loaders.report import UiReport, dora_notes, label

_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_OPEN_CLIP = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)$")
_COMMON_PARTS = {"alpha", "scale", "bias", "dora_scale"}


def _num(text: str) -> int:
    return int(text)


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """A1111's conversion of a diffusers-named kohya module part (it assumes two layers per block)."""
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{_num(m[1]) * 2 - 2}{m[2]}"
    for side, ldm_blocks, first in (("down", "input_blocks", 1), ("up", "output_blocks", 0)):
        if m := re.match(rf"lora_unet_{side}_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
            suffix = _RESNET_SUFFIX.get(m[4], m[4]) if m[2] == "resnets" else m[4]
            index = first + _num(m[1]) * 3 + _num(m[3])
            return f"diffusion_model_{ldm_blocks}_{index}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else _num(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + _num(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        block = _num(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_open_clip_part(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_{_open_clip_part(m[2])}"
    return key


def _open_clip_part(part: str) -> str:
    if "mlp_fc1" in part:
        return part.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in part:
        return part.replace("mlp_fc2", "mlp_c_proj")
    return part.replace("self_attn", "attn")


def _module_names(names: FamilyNames) -> tuple[dict[str, Target], dict[str, dict[str, Target]]]:
    """A1111's module names (``network_layer_mapping``) of the Linear/Conv2d modules -> module, and its
    OpenCLIP attention modules -> their q/k/v projections."""
    direct: dict[str, Target] = {}
    attention: dict[str, dict[str, Target]] = {}
    sdxl = names.family == "sdxl"
    for target, info in names.modules.items():
        component = target[0]
        if component == 0:
            if info.ldm is not None:
                direct[f"diffusion_model_{underscored(info.ldm)}"] = target
            continue
        hf = str(info.ldm)
        if not ((names.family == "sd2" and component == 1) or (sdxl and component == 2)):
            direct[("0_transformer_" if sdxl else "transformer_") + underscored(hf)] = target
            continue
        m = _OPEN_CLIP.match(hf)
        if m is None:
            continue  # OpenCLIP's text projection is a parameter, not a module
        base = f"{'1_' if sdxl else ''}model_transformer_resblocks_{m[1]}"
        if m[3] in ("q", "k", "v"):
            attention.setdefault(f"{base}_attn", {})[f"{m[3]}_proj"] = target
        else:
            direct[base + {"self_attn.out_proj": "_attn_out_proj", "mlp.fc1": "_mlp_c_fc",
                           "mlp.fc2": "_mlp_c_proj"}[m[2]]] = target
    return direct, attention


def _lookup(module_part: str, names: FamilyNames, direct: dict[str, Target],
            attention: dict[str, dict[str, Target]]) -> tuple[str, Target | None]:
    sd_key = convert_diffusers_name_to_compvis(module_part, names.family == "sd2")
    target = direct.get(sd_key)
    if target is None and (m := _X_PROJ.match(sd_key)):
        target = attention.get(m[1], {}).get(m[2])
    if target is None and "lora_unet" in module_part:
        sd_key = module_part.replace("lora_unet", "diffusion_model")
        target = direct.get(sd_key)
    elif target is None and "lora_te1_text_model" in module_part:
        sd_key = module_part.replace("lora_te1_text_model", "0_transformer_text_model")
        target = direct.get(sd_key)
        if target is None:
            sd_key = module_part.replace("lora_te1_text_model", "transformer_text_model")
            target = direct.get(sd_key)
    return sd_key, target


def module_type(parts: set[str]) -> tuple[str, set[str]] | None:
    """The first of A1111's module types whose create_module accepts the tensors, and what it reads."""
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        return "lora", {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}
    if {"lora_A.weight", "lora_B.weight"} <= parts:
        return "lora", {"lora_A.weight", "lora_B.weight"}
    hada = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if hada <= parts:
        return "loha", hada | {"hada_t1", "hada_t2"}
    if "weight" in parts:
        return "ia3", {"weight", "on_input"}
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    if has_1 and has_2:
        return "lokr", {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    if "diff" in parts:
        return "full", {"diff", "diff_b"}
    if {"w_norm", "b_norm"} <= parts:
        return "norm", {"w_norm", "b_norm"}
    glora = {"a1.weight", "a2.weight", "b1.weight", "b2.weight"}
    if glora <= parts:
        return "glora", glora
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "oft", {"oft_blocks", "oft_diag", "rescale"}
    return None


def resolve(parsed: ParsedFile, names: FamilyNames) -> UiReport:
    report = UiReport("a1111")
    direct, attention = _module_names(names)
    groups: dict[str, tuple[Target, dict[str, str]]] = {}
    for key in parsed.shapes:
        module_part, _, part = key.partition(".")
        sd_key, target = _lookup(module_part, names, direct, attention)
        if target is None:
            if not module_part.startswith(("lora_", "oft_")):
                report.ignored[key] = (f"AUTOMATIC1111 reads kohya/LyCORIS keys only: it takes what comes before "
                                       f"the first dot, '{module_part}', as the module, and that names none")
            else:
                report.ignored[key] = f"'{module_part}' becomes '{sd_key}', which names no module of the model"
            continue
        groups.setdefault(sd_key, (target, {}))[1][part] = key
    for sd_key, (target, parts) in groups.items():
        chosen = module_type(set(parts))
        if chosen is None:
            report.refused = (f"module '{sd_key}' has tensors {sorted(parts)} that no module type accepts: "
                              f"AUTOMATIC1111 raises 'Could not find a module type' and loads none of the file")
            continue
        kind, reads = chosen
        if kind == "oft" and len(parsed.shapes.get(parts.get("oft_blocks", ""), ())) == 4:
            for key in parts.values():
                # Worded without quotes: verify groups reasons with their quoted names masked.
                report.ignored[key] = ("the OFT module of AUTOMATIC1111 reads oft_blocks as [blocks, b, b]; BOFT "
                                       "blocks [stages, blocks, b, b] make its calc_updown fail, and the module is "
                                       "skipped with an error")
            continue
        for part, key in parts.items():
            if part in reads or part in _COMMON_PARTS:
                report.loaded[key] = label(target)
            else:
                report.ignored[key] = f"a {kind} module in AUTOMATIC1111 reads no '{part}'"
    report.notes.extend(dora_notes(parsed, "a1111"))
    return report
