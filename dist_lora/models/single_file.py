"""Write a pipeline as one LDM/SGM-style ``.safetensors`` checkpoint (what A1111, ComfyUI and Civitai use).

The key layout is the inverse of diffusers' single-file loader, so ``from_single_file`` reads it back:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*``
(SD 1.x CLIP) or ``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*``
(SDXL CLIP-L and OpenCLIP-bigG layouts).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dist_lora.models.names import UNetLayout, unet_diffusers_to_ldm
from dist_lora.utils.files import atomic_path


def unet_to_ldm(unet: nn.Module) -> dict[str, torch.Tensor]:
    layout = UNetLayout.from_config(unet.config)  # type: ignore[attr-defined]
    return {f"model.diffusion_model.{unet_diffusers_to_ldm(k, layout)}": v
            for k, v in unet.state_dict().items()}


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)

    def up(m: re.Match[str]) -> str:
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.{m[2]}."

    key = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", up, key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                     ("to_out.0.", "proj_out.")):
        if "mid.attn_1." in key:
            key = key.replace("mid.attn_1." + old, "mid.attn_1." + new)
    return key


def vae_to_ldm(vae: nn.Module) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)  # type: ignore[attr-defined]
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(key, num_up)
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linears.
        if "mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[f"first_stage_model.{ldm_key}"] = value
    return out


def hf_clip_state_dict(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers CLIP state dict in its classic ``text_model.*`` spelling.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); checkpoints and
    loaders everywhere still use the prefixed names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


def clip_to_ldm(text_encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP layout: the transformers keys under a prefix."""
    return {prefix + k: v for k, v in hf_clip_state_dict(text_encoder).items()}


def open_clip_to_ldm(text_encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SDXL's second encoder): fused qkv, ``resblocks``, transposed projection."""
    sd = hf_clip_state_dict(text_encoder)
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    layers = text_encoder.config.num_hidden_layers  # type: ignore[attr-defined]
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe: object) -> dict[str, torch.Tensor]:
    """The full single-file state dict of an SD 1.x or SDXL diffusers pipeline."""
    state = unet_to_ldm(pipe.unet) | vae_to_ldm(pipe.vae)  # type: ignore[attr-defined]
    if getattr(pipe, "text_encoder_2", None) is not None:
        state |= clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")  # type: ignore[attr-defined]
        state |= open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")  # type: ignore[attr-defined]
    else:
        state |= clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer.")  # type: ignore[attr-defined]
    return state


def save_single_file(pipe: object, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    state = pipeline_to_ldm(pipe)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
