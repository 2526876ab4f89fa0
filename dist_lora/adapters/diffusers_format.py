"""The diffusers/peft layout (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` peft keys plus the
peft config in the file's metadata), written by diffusers' own ``save_lora_weights``.

diffusers' ``load_lora_weights`` reads it back for lora, locon and dora; LoHa/LoKr files in this layout
are for peft (``set_peft_model_state_dict``), as diffusers' pipelines have no loader for them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers
from dist_lora.utils.files import atomic_path

_ENCODER_ARGS = ("text_encoder", "text_encoder_2")


def save_diffusers_lora(path: str | Path, unet: nn.Module, text_encoders: list[nn.Module], family: str,
                        dtype: torch.dtype) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def layers(model: nn.Module) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    kwargs: dict[str, object] = {"unet_lora_layers": layers(unet),
                                 "unet_lora_adapter_metadata": unet.peft_config[ADAPTER_NAME].to_dict()}
    for arg, encoder in zip(_ENCODER_ARGS, text_encoders, strict=False):
        if next(adapter_layers(encoder), None) is not None:
            kwargs[f"{arg}_lora_layers"] = layers(encoder)
            kwargs[f"{arg}_lora_adapter_metadata"] = encoder.peft_config[ADAPTER_NAME].to_dict()
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as staging, atomic_path(path) as tmp:
        pipeline_cls.save_lora_weights(staging, weight_name=path.name, safe_serialization=True, **kwargs)
        Path(staging, path.name).replace(tmp)
    return path
