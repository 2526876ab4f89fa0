"""Rendering sample images with diffusers' own Stable Diffusion pipelines, built around modules already
in memory (the live, adapted UNet and text encoders during training).

Prompts are encoded by the same function training uses (``models.text.encode_prompts``) and handed to
the pipeline as embeddings, so a sample is conditioned exactly as a training step is. The pipeline runs
the sampler loop and stops at the latents; the VAE then decodes in fp32 outside autocast (an fp16 VAE
overflows into black images). The initial noise comes from a CPU generator seeded with the prompt's
seed, so an image does not depend on the device or on the training run's random state.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, PngImagePlugin
from torch import nn

from dist_lora.models.text import DEFAULT_TEXT_ENCODING, TextEncoding, encode_prompts, tokenize
from dist_lora.sampling.prompts import SamplePrompt
from dist_lora.sampling.samplers import find_sampler

if TYPE_CHECKING:  # diffusers' pipelines load slowly: imported when a pipeline is built
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


@dataclass
class RenderModules:
    family: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler_config: Any  # the base model's noise scheduler config (betas, prediction type)
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    text_encoding: TextEncoding = DEFAULT_TEXT_ENCODING  # as in training


def build_pipeline(m: RenderModules) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = find_sampler("euler").build(m.scheduler_config)  # replaced per prompt
    if m.family == "sdxl":
        return StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1],
                                         tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], unet=m.unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _embeddings(m: RenderModules, prompt: SamplePrompt, device: torch.device) -> dict[str, torch.Tensor]:
    ids = tokenize(m.tokenizers, [prompt.prompt, prompt.negative_prompt], m.text_encoding)
    with m.autocast():
        hidden, pooled = encode_prompts(m.text_encoders, [i.to(device) for i in ids], m.family, m.text_encoding)
    out = {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}
    if pooled is not None:
        out.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    return out


@torch.no_grad()
def render(pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline, m: RenderModules,
           prompt: SamplePrompt) -> Image.Image:
    """One image for ``prompt`` with the modules as they are now."""
    device = next(m.unet.parameters()).device
    pipeline.scheduler = find_sampler(prompt.sampler).build(m.scheduler_config)
    generator = torch.Generator("cpu").manual_seed(prompt.seed)
    with m.autocast():
        latents = pipeline(**_embeddings(m, prompt, device), width=prompt.width, height=prompt.height,
                           num_inference_steps=prompt.steps, guidance_scale=prompt.cfg_scale, generator=generator,
                           output_type="latent", return_dict=False)[0]
    return decode(pipeline, m.vae, latents)


def decode(pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline, vae: nn.Module,
           latents: torch.Tensor) -> Image.Image:
    """Latents -> image, with the VAE in fp32 and autocast off."""
    dtype = next(vae.parameters()).dtype
    if dtype != torch.float32:
        vae.to(torch.float32)
    try:
        with torch.autocast(latents.device.type, enabled=False):
            pixels = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    return pipeline.image_processor.postprocess(pixels, output_type="pil")[0]  # type: ignore[no-any-return]


def a1111_parameters(prompt: SamplePrompt, adapter: str = "", weight: float = 1.0) -> str:
    """The "parameters" text A1111 writes into its PNGs; the adapter and its weight go into the prompt as
    A1111's ``<lora:name:weight>`` does, so "PNG Info -> Send to txt2img" reproduces the setting."""
    text = prompt.prompt + (f" <lora:{adapter}:{weight:g}>" if adapter else "")
    label = find_sampler(prompt.sampler).label
    return (f"{text}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, Sampler: {label}, "
            f"CFG scale: {prompt.cfg_scale:g}, Seed: {prompt.seed}, Size: {prompt.width}x{prompt.height}")


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_name(prompt: SamplePrompt) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.prompt.lower()).strip("-")[:48] or "prompt"
    return f"{prompt.number:02d}-{slug}.png"


def grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 0, title: str = "") -> Image.Image:
    """Images in a grid, each labelled below; cells as large as the largest image."""
    from PIL import ImageDraw

    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    width = max(i.width for i in images)
    height = max(i.height for i in images)
    label_h, title_h = 14, 16 if title else 0
    sheet = Image.new("RGB", (columns * width, title_h + rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black")
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (index % columns) * width, title_h + (index // columns) * (height + label_h)
        sheet.paste(image.convert("RGB"), (x, y))
        draw.text((x + 2, y + height + 1), label[: max(4, width // 6)], fill="black")
    return sheet
