"""diffusers' ``load_lora_weights``, run on the file's tensors: its own conversion functions decide.

The steps of ``StableDiffusion[XL]Pipeline.load_lora_weights`` up to the point where peft takes over:
``lora_state_dict`` (drops ``dora_scale``, converts kohya keys when every key has a kohya prefix, SDXL's SGM
names through the UNet's config, and refuses what it cannot convert), the check that every key holds
"lora", the split by the ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefixes (other keys reach no
model), and the UNet's and text encoders' own key conversions. A resulting key whose module the model does
not have is one peft reports as unexpected and leaves out.
"""

from __future__ import annotations

import re
from functools import cache

import torch

from dist_lora.adapters.loaders.layouts import ParsedFile, load_tensors
from dist_lora.adapters.loaders.names import FamilyNames, Target
from dist_lora.adapters.loaders.report import UiReport, label

_PEFT_PART = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)(\.[^.]+)?(\.weight)?$")
_PREFIXES = {"unet": 0, "text_encoder": 1, "text_encoder_2": 2}


def _pipeline_class(family: str) -> type:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _convert(component: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not state:
        return state
    if component == 0:
        return state if "lora_A" in next(iter(state)) else convert_unet_state_dict_to_peft(state)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


@cache
def text_encoders_load_dora_magnitudes() -> bool:
    """Whether this install's diffusers loads a text encoder's DoRA magnitudes (``lora_magnitude_vector``):
    diffusers hands text encoder adapters to transformers' ``load_adapter``, whose own renaming decides.
    Found by loading one into a 1-layer CLIP text encoder, as ``load_lora_weights`` would."""
    import logging

    from diffusers.loaders.lora_base import _load_lora_into_text_encoder
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=32, max_position_embeddings=8,
                                               eos_token_id=2, projection_dim=8))
        path = next(n for n, _ in encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        magnitude = torch.full((8,), 3.0)
        state = {f"text_encoder.{path}.lora_A.weight": torch.ones(2, 8),
                 f"text_encoder.{path}.lora_B.weight": torch.ones(8, 2),
                 f"text_encoder.{path}.lora_magnitude_vector": magnitude}
        _load_lora_into_text_encoder(state, None, encoder, prefix="text_encoder")
        loaded = next(encoder.get_submodule(path).lora_magnitude_vector.parameters())
        return bool(torch.equal(loaded.detach().flatten(), magnitude))
    finally:
        transformers_logging.set_verbosity(verbosity)
        diffusers_logger.setLevel(level)


def _module_paths(names: FamilyNames) -> dict[tuple[int, str], Target]:
    """Module paths peft may be given -> module: text encoder paths with or without ``text_model.``."""
    paths: dict[tuple[int, str], Target] = {}
    for target, info in names.modules.items():
        paths[target] = target
        if target[0] and info.ldm:
            paths[(target[0], info.ldm)] = target
    return paths


def resolve(parsed: ParsedFile, names: FamilyNames) -> UiReport:
    report = UiReport("diffusers")
    tensors = load_tensors(parsed)
    origin = {id(t): k for k, t in tensors.items()}
    if any("dora_scale" in k for k in tensors):
        dropped = [k for k in tensors if "dora_scale" in k]
        for key in dropped:
            report.ignored[key] = "diffusers drops kohya-layout DoRA magnitudes ('dora_scale') and applies the " \
                                  "module as plain LoRA"
    try:
        state, _alphas = _pipeline_class(parsed.family).lora_state_dict(dict(tensors),
                                                                        unet_config=names.unet_config)
    except (ValueError, KeyError) as exc:
        report.refused = f"load_lora_weights raises: {str(exc).strip().splitlines()[0][:300]}"
        return report
    lacking = [k for k in state if "lora" not in k]
    if lacking:
        report.refused = (f"load_lora_weights raises 'Invalid LoRA checkpoint' (every key must hold 'lora'), "
                          f"e.g. for {origin.get(id(state[lacking[0]]), lacking[0])}")
        return report
    by_component: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}, 2: {}}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        component = _PREFIXES.get(prefix)
        if component is None or (component == 2 and parsed.family != "sdxl"):
            report.ignored[origin.get(id(tensor), key)] = f"no '{'/'.join(_PREFIXES)}.' prefix for this " \
                                                          f"pipeline: diffusers passes it to no model"
            continue
        by_component[component][rest] = tensor
    paths = _module_paths(names)
    for component, part in by_component.items():
        for key, tensor in _convert(component, part).items():
            file_key = origin.get(id(tensor), key)
            module = _PEFT_PART.sub("", key)
            target = paths.get((component, module))
            if target is not None and component and key.endswith("lora_magnitude_vector") \
                    and not text_encoders_load_dora_magnitudes():
                report.ignored[file_key] = ("diffusers passes text encoder adapters to transformers' "
                                            "load_adapter, which leaves this DoRA magnitude unloaded (at its "
                                            "initial value: the module is applied with the wrong magnitude)")
            elif target is None:
                model = ("UNet", "text encoder", "second text encoder")[component]
                report.ignored[file_key] = f"'{module}' names no module of the {model}: peft leaves it out as " \
                                           f"unexpected"
            else:
                report.loaded[file_key] = label(target)
    for key in tensors:
        # kohya alphas become network_alphas (the scale); diffusers-layout files carry it in their metadata.
        if key.endswith(".alpha") and key not in report.loaded and key not in report.ignored:
            module = parsed.modules.get(parsed.module_of_key.get(key, ""))
            loaded = module is not None and any(k in report.loaded for k in module.tensor_keys())
            if loaded and module is not None and module.target is not None:
                report.loaded[key] = label(module.target)
            else:
                report.ignored[key] = "an alpha of no module diffusers loads"
    return report
