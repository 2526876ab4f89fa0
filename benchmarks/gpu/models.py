"""The suite's models and inputs: full-size UNets with random weights (or the tiny pipeline), batches as a
cache yields them, the training configs of the rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.context import RESOLUTION, Suite
from dist_lora.config import Config, config_from_dict
from dist_lora.data.shards import Batch
from dist_lora.models.load import Components, load_components
from dist_lora.models.reference import FULL_SIZE, sdxl_pooled_width, write_config_folder
from dist_lora.models.tiny import write_tiny_pipeline

NETWORK = {"rank": 16, "alpha": 16.0, "preset": "attn_ff"}


def tiny_folder(suite: Suite, arch: str) -> Path:
    key = ("tiny_folder", arch)
    if key not in suite.cache:
        suite.cache[key] = write_tiny_pipeline(arch, suite.work / f"tiny_{arch}")
    return suite.cache[key]


def config_folder(suite: Suite, arch: str) -> Path:
    """A diffusers folder of config.json files only (what ``dist-lora plan`` reads), or the tiny pipeline."""
    if suite.size == "tiny":
        return tiny_folder(suite, arch)
    key = ("config_folder", arch)
    if key not in suite.cache:
        suite.cache[key] = write_config_folder(arch, suite.work / f"configs_{arch}")
    return suite.cache[key]


def unet_config(suite: Suite, arch: str) -> dict[str, Any]:
    return json.loads((config_folder(suite, arch) / "unet" / "config.json").read_text())


def _pristine_unet(suite: Suite, arch: str) -> torch.nn.Module:
    """The UNet with its random weights, built once and kept in host memory: every case gets a fresh copy,
    and the copy kept aside is not in any measured device peak."""
    from diffusers import UNet2DConditionModel

    key = ("unet", arch)
    if key not in suite.cache:
        if suite.size == "tiny":
            unet = load_components(str(tiny_folder(suite, arch)), load_text=False, load_vae=False).unet
        else:
            torch.manual_seed(0)
            # Initialised on the device (seconds, not minutes on the host), then parked in host memory.
            with torch.device(suite.device):
                unet = UNet2DConditionModel.from_config(FULL_SIZE[arch]["unet"]).to(torch.bfloat16)
            unet.to("cpu")
        suite.cache[key] = unet.requires_grad_(False)
    return suite.cache[key]


def components(suite: Suite, arch: str, dtype: torch.dtype, *, vae: bool = False) -> Components:
    """A fresh UNet (+ VAE) of ``arch`` on the device in ``dtype``: the published architecture with random
    weights, or the tiny pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler

    unet = copy.deepcopy(_pristine_unet(suite, arch)).to(suite.device, dtype)
    autoencoder = None
    if vae:
        if suite.size == "tiny":
            autoencoder = load_components(str(tiny_folder(suite, arch)), load_text=False, load_vae=True).vae
        else:
            with torch.device(suite.device):
                autoencoder = AutoencoderKL.from_config(FULL_SIZE[arch]["vae"])
        autoencoder.to(suite.device)  # type: ignore[union-attr]
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return Components("sdxl" if arch == "sdxl" else "sd1", "epsilon", [], [], autoencoder, unet, scheduler)


def cached_batch(suite: Suite, arch: str, batch: int, *, pixels: bool = False) -> Batch:
    """A batch as the loader yields it from a cache: latent posteriors and text-encoder outputs."""
    side = RESOLUTION[suite.size][arch]
    generator = torch.Generator().manual_seed(0)
    config = unet_config(suite, arch)
    hidden = torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)
    pooled = torch.randn(batch, sdxl_pooled_width(config), generator=generator) if arch == "sdxl" else None
    metas = [{"original_size": [side, side], "crop_top_left": [0, 0], "target_size": [side, side]}] * batch
    common = {"keys": [f"s{i}" for i in range(batch)], "captions": [""] * batch, "metas": metas,
              "weights": torch.ones(batch), "hidden": hidden, "pooled": pooled}
    if pixels:
        return Batch(**common, pixels=torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8,
                                                    generator=generator))
    latent = torch.randn(batch, 4, side // 8, side // 8, generator=generator)
    return Batch(**common, latent_mean=latent, latent_std=torch.full_like(latent, 0.05))


def run_config(suite: Suite, *, batch: int, checkpointing: bool, precision: str = "bf16", optimizer: str = "adamw",
               base_dtype: str = "auto") -> Config:
    return config_from_dict({
        "model": {"pretrained": "unused", "base_dtype": base_dtype}, "data": {"shards": "unused"},
        "network": dict(NETWORK), "optimizer": {"type": optimizer, "lr": 1e-5},
        "training": {"batch_size": batch, "gradient_checkpointing": checkpointing, "mixed_precision": precision,
                     "max_steps": suite.warmup + suite.steps},
        "output": {"dir": str(suite.work / "run")}, "logging": {"progress_bar": False, "log_every": 10_000}})


def write_sd15_folder(suite: Suite, folder: Path) -> None:
    """An SD 1.5 diffusers folder for the real trainer: random full-size weights, or the tiny pipeline."""
    if suite.size == "tiny":
        write_tiny_pipeline("sd15", folder)
        return
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = FULL_SIZE["sd15"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_folder(suite, "sd15") / "tokenizer"),
        unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
