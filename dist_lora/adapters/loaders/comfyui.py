"""ComfyUI's key rules (comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip`` / ``load_lora``,
comfy/weight_adapter), restated.

ComfyUI builds a map of module parts it knows -> model weight, then asks each of them for the tensor names
of its adapter types; every key of the file left unasked is reported as "lora key not loaded".
UNet module parts: ``lora_unet_`` + LDM name, ``diffusion_model.`` + LDM name, ``lora_unet_`` + diffusers
name, ``lycoris_`` + diffusers name, and the diffusers attention-processor spellings (``[unet.]<module>`` with
``.processor.to_q`` and ``to_out`` for ``to_out.0``; the peft spelling ``unet.<module>.to_q`` is not among
them). Text encoders: the q/k/v/out projections and the MLP of each layer, as ``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` and ``text_encoder[_2].text_model.encoder.layers...``.
"""

from __future__ import annotations

from dist_lora.adapters.loaders.layouts import ParsedFile
from dist_lora.adapters.loaders.names import FamilyNames, Target, underscored
from dist_lora.adapters.loaders.report import UiReport, dora_notes, label

_CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
# Tensor names per adapter type, after "<module part>" (LoRA's several spellings, LoHa, LoKr, GLoRA, OFT/BOFT).
_LORA_SPELLINGS = ((".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
                   ("_lora.up.weight", "_lora.down.weight"),
                   (".lora_B.weight", ".lora_A.weight"),
                   (".lora.up.weight", ".lora.down.weight"),
                   (".lora_B", ".lora_A"),
                   (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                   (".lora_B.default.weight", ".lora_A.default.weight"))
_LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
_LOKR = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
_ALWAYS = (".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight", ".reshape_weight")


def key_map(names: FamilyNames) -> dict[str, Target]:
    """ComfyUI's module parts for a model of this family -> module."""
    mapping: dict[str, Target] = {}
    sdxl = names.family == "sdxl"
    for target, info in names.modules.items():
        component, path = target
        if component == 0:
            if info.ldm is not None:
                mapping[f"lora_unet_{underscored(info.ldm)}"] = target
                mapping[f"diffusion_model.{info.ldm}"] = target
            mapping[f"lora_unet_{underscored(path)}"] = target
            mapping[f"lycoris_{underscored(path)}"] = target
            processor = path.replace(".to_", ".processor.to_")
            processor = processor.removesuffix(".0") if processor.endswith(".to_out.0") else processor
            for prefix in ("", "unet."):
                mapping[f"{prefix}{processor}"] = target
            continue
        hf = str(info.ldm)  # text_model.encoder.layers.N.<part>
        parts = hf.removeprefix("text_model.encoder.layers.").split(".", 1)
        if not hf.startswith("text_model.encoder.layers.") or parts[1] not in _CLIP_PARTS \
                or int(parts[0]) >= 32:
            if sdxl and component == 2 and path == "text_projection":
                mapping["lora_te2_text_projection"] = target
            continue
        kohya_part = f"text_model_encoder_layers_{parts[0]}_{_CLIP_PARTS[parts[1]]}"
        if component == 1:
            mapping[f"lora_te_{kohya_part}"] = target
            mapping[f"lora_te1_{kohya_part}"] = target
            mapping[f"text_encoder.{hf}"] = target
        else:
            mapping[f"lora_te2_{kohya_part}"] = target
            mapping[f"text_encoder_2.{hf}"] = target
    return mapping


def _asked(module_part: str, present: set[str]) -> set[str]:
    """The keys ComfyUI's adapters take for one module part of its map."""
    asked = {module_part + s for s in _ALWAYS} & present
    for up, down, *mid in _LORA_SPELLINGS:
        if module_part + up in present:
            asked |= {module_part + up, module_part + down, *(module_part + m for m in mid)} & present
            break
    if module_part + ".hada_w1_a" in present:
        asked |= {module_part + s for s in (*_LOHA, ".hada_t1", ".hada_t2")} & present
    lokr = {module_part + s for s in _LOKR} & present
    if lokr:
        asked |= lokr
    for tensor in (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale"):
        if module_part + tensor in present:
            asked.add(module_part + tensor)
    return asked


def resolve(parsed: ParsedFile, names: FamilyNames) -> UiReport:
    report = UiReport("comfyui")
    present = set(parsed.shapes)
    mapping = key_map(names)
    taken: dict[str, Target] = {}
    for module_part, target in mapping.items():
        for key in _asked(module_part, present):
            taken[key] = target
    for key in parsed.shapes:
        spelled = parsed.module_of_key.get(key, "")
        if key in taken:
            report.loaded[key] = label(taken[key])
        elif spelled in mapping:
            report.ignored[key] = f"lora key not loaded: ComfyUI maps '{spelled}', but none of its adapters reads " \
                                  f"'{key.removeprefix(spelled)}'"
        else:
            report.ignored[key] = "lora key not loaded: its module part is none ComfyUI maps for this model"
    report.notes.extend(dora_notes(parsed, "comfyui"))
    return report
