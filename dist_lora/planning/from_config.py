"""A memory plan for a training config: which model, image size, caches and precision it implies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_lora.config import Config
from dist_lora.data.captions import CaptionTransform, caption_policy
from dist_lora.data.manifest import Manifest
from dist_lora.errors import DistLoraError
from dist_lora.planning.estimate import GIB, Plan, RunSettings, Suggestion, estimate, suggestions
from dist_lora.planning.shapes import ModelSizes, PlanInputError, measure_model
from dist_lora.train.precision import WEIGHT_DTYPES, resolve_mixed_precision

_DEFAULT_RESOLUTION = {"sd1": 512, "sdxl": 1024}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'24GiB', '24 GB', '80' (GiB), '81920MiB' -> bytes. GB is read as GiB, as GPU vendors mean it."""
    match = _SIZE.match(text)
    if not match:
        raise DistLoraError(f"--gpu-memory '{text}' is not a size; write e.g. 24GiB, 80GB or 16384MiB.")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    return int(value * (2**20 if unit in ("mib", "mb") else GIB))


def model_config_folder(cfg: Config) -> Path:
    pretrained = Path(cfg.model.pretrained).expanduser()
    for folder in (pretrained, Path(cfg.model.config_dir).expanduser() if cfg.model.config_dir else None):
        if folder is not None and (folder / "unet" / "config.json").is_file():
            return folder
    raise PlanInputError(f"model.pretrained '{cfg.model.pretrained}' is not a diffusers folder with unet/config.json; "
                         f"for a single-file checkpoint or a hub id set model.config_dir to a diffusers folder of the "
                         f"same architecture (only its config.json files are read).")


@dataclass(frozen=True)
class PlanResult:
    sizes: ModelSizes
    plan: Plan
    advice: list[Suggestion]
    budget: int | None


def _image_size(cfg: Config, family: str, resolution: int) -> tuple[tuple[int, int], Manifest | None]:
    try:
        manifest = Manifest.read(cfg.data.shards)
    except DistLoraError:
        manifest = None
    if resolution:
        return (resolution, resolution), manifest
    if manifest is not None and manifest.shards:
        # The largest bucket sets the peak: [width, height] in pixels.
        width, height = max((tuple(s.get("bucket", (manifest.resolution,) * 2)) for s in manifest.shards),
                            key=lambda b: b[0] * b[1])
        return (int(height), int(width)), manifest
    side = _DEFAULT_RESOLUTION[family]
    return (side, side), manifest


def plan_for_config(cfg: Config, *, gpus: int = 1, zero_stage: int = 0, budget: int | None = None,
                    resolution: int = 0) -> PlanResult:
    folder = model_config_folder(cfg)
    family = "sdxl" if (folder / "text_encoder_2").is_dir() else "sd1"
    t = cfg.training
    # A plan is for a GPU: 'auto' is bf16 there (fp16 on older GPUs takes the same memory).
    precision = resolve_mixed_precision(t.mixed_precision, cuda=True, bf16_supported=True)
    size, manifest = _image_size(cfg, family, resolution)
    sizes = measure_model(folder, cfg.network, size, WEIGHT_DTYPES[precision])
    cache = manifest.cache if manifest is not None and cfg.data.use_cache else None
    d = cfg.data
    captions_change = caption_policy(d, manifest).active if manifest is not None else \
        CaptionTransform.from_options(d).active
    run = RunSettings(
        batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=precision, gradient_checkpointing=t.gradient_checkpointing, optimizer=cfg.optimizer.type,
        cached_latents=bool(cache and cache.latents),
        cached_text=bool(cache and cache.text) and not captions_change and not cfg.network.train_text_encoder,
        train_text_encoder=cfg.network.train_text_encoder, vae_fp32=t.vae_fp32, gpus=gpus, zero_stage=zero_stage,
        base_dtype=cfg.model.base_dtype, fp8_text_encoders=cfg.model.fp8_text_encoders,
        offload_frozen=cfg.model.offload_frozen, text_cacheable=not captions_change)
    plan = estimate(sizes, run)
    advice = suggestions(sizes, run, budget) if budget is not None and plan.device_total > budget else []
    return PlanResult(sizes, plan, advice, budget)


def device_memory() -> int | None:
    """Total memory of this process's GPU, if there is one."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
