"""Tiny SD 1.5 and SDXL pipelines with random weights, built locally (no hub) from a fixed seed.

They keep the real models' structure where it matters to a trainer: 8x VAE downsampling, two layers
per UNet block, cross-attention fed by CLIP hidden states, and for SDXL two text encoders (the second
with a projection) plus ``text_time`` micro-conditioning. Only widths and depths are small.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Arch = Literal["sd15", "sdxl"]

TEXT_WIDTH = 32
# SDXL's encoders differ in width (768 / 1280); diffusers' single-file loader tells them apart by it.
TEXT_WIDTH_2 = 48
TEXT_MAX_LENGTH = 77
TINY_RESOLUTION = 128  # pixels; 16x16 latents


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-character table (the base alphabet of its BPE)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# A few merges of frequent English fragments so captions are not tokenised letter by letter.
_MERGES = ["t h", "th e</w>", "i n", "a n", "o n</w>", "e r", "r e", "o f</w>", "an d</w>", "in g</w>"]


def build_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a small generated vocabulary: all 256 bytes, their word-final forms,
    a handful of merges and the two special tokens. Any UTF-8 caption encodes losslessly."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for merge in _MERGES:
        left, right = merge.split()
        if left in vocab and right in vocab:  # a merge may only join tokens that exist
            merges.append(merge)
            vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        kwargs = {"pad_token": pad_token} if pad_token else {}
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=TEXT_MAX_LENGTH, **kwargs)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        # Like SD's 0.18215, chosen so that latents of natural-looking images have about unit variance
        # (the posterior means of this random encoder have a standard deviation near 0.2).
        scaling_factor=5.0,
    )
    with torch.no_grad():
        # A trained VAE's posterior is nearly deterministic; a random one has std ~1, which would
        # drown the image in sampling noise. Push log-variance down to std ~ e^-6.
        vae.quant_conv.bias[4:].fill_(-12.0)
    return vae


def _scheduler_kwargs() -> dict[str, object]:
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1}


def build_sd15(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu", TEXT_WIDTH))
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **_scheduler_kwargs())
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu", TEXT_WIDTH))
    # OpenCLIP-style encoder: gelu, and (as in real SDXL) projection width == hidden width.
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu", TEXT_WIDTH_2))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH_2,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **_scheduler_kwargs())
    vae = _vae()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def build_tiny_pipeline(arch: Arch, seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    if arch == "sd15":
        return build_sd15(seed)
    if arch == "sdxl":
        return build_sdxl(seed)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected 'sd15' or 'sdxl'")


def write_tiny_pipeline(arch: Arch, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete diffusers-format pipeline folder (model_index.json and all components)."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(arch, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
