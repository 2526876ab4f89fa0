"""The reference of the step-overhead benchmark: an SDXL LoRA training loop written the usual diffusers way.

It is the plainest correct loop: diffusers' and transformers' classes loaded directly, peft adapters added
with ``unet.add_adapter``, images decoded and transformed in the main process by a ``DataLoader`` with no
workers, VAE and both text encoders run every step, batch-level ``torch.randn_like`` noise and
``torch.randint`` timesteps, MSE loss, backward, gradient clipping and AdamW. No guards, no keyed draws,
no metrics. Nothing of dist_lora is imported, so the trainer's costs cannot hide in it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class ImageCaptionFolder(Dataset):
    """Every image of a kohya-style folder tree with the caption in the ``.txt`` beside it."""

    def __init__(self, root: Path, resolution: int) -> None:
        self.images = sorted(p for p in root.rglob("*.png"))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def resize_and_crop(self, image: Image.Image) -> torch.Tensor:
        """Shorter side to the resolution, centre crop, [-1, 1] (torchvision's Resize, CenterCrop,
        ToTensor and Normalize(0.5, 0.5))."""
        r = self.resolution
        scale = r / min(image.size)
        w, h = max(r, round(image.width * scale)), max(r, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - r) // 2, (h - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(r, r, 3)
        return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.images[index]
        with Image.open(path) as image:
            pixels = self.resize_and_crop(image.convert("RGB"))
        return pixels, path.with_suffix(".txt").read_text(encoding="utf-8")


def plain_sdxl_lora_loop(model: Path, images: Path, *, steps: int, batch_size: int, resolution: int,
                         rank: int, seed: int = 0, on_step: Callable[[], None] = lambda: None) -> int:
    """Train for ``steps`` optimizer steps, calling ``on_step`` after each; returns the number of trainable
    adapter parameters."""
    torch.manual_seed(seed)
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (vae, unet, *encoders):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=ATTENTION_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    loader = DataLoader(ImageCaptionFolder(images, resolution), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=0)
    size = (resolution, resolution)
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32).repeat(batch_size, 1)
    unet.train()
    done = 0
    while done < steps:
        for pixels, captions in loader:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                hidden, pooled = [], None
                for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
                    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
                    out = encoder(ids, output_hidden_states=True)
                    hidden.append(out.hidden_states[-2])
                    pooled = out[0]
                prompt = torch.cat(hidden, dim=-1)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=prompt,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            on_step()
            if done == steps:
                break
    return sum(p.numel() for p in params)
