"""Find, recognise and load a base model: diffusers folder, hub id, or single-file checkpoint.

``inspect_model_source`` only reads small files (JSON configs, a safetensors header), so a bad path
or an unsupported file is reported before anything heavy is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dist_lora.errors import DistLoraError
from dist_lora.models.text import DEFAULT_TEXT_ENCODING, TextEncoding

Family = Literal["sd1", "sd2", "sdxl"]
SourceKind = Literal["folder", "single_file", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(DistLoraError):
    """The base model cannot be used; the message names the path and what was expected."""


@dataclass(frozen=True)
class ModelSource:
    location: str
    kind: SourceKind
    family: Family | None  # None: a hub id, recognised once its files are fetched
    prediction_type: str | None


@dataclass
class Components:
    family: Family
    prediction_type: str
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    vae: nn.Module | None  # None when training from cached latents
    unet: nn.Module
    noise_scheduler: Any
    text_encoding: TextEncoding = DEFAULT_TEXT_ENCODING  # kohya's clip_skip / max_token_length, set by the caller


def _family_from_folder(folder: Path) -> Family:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    config_path = folder / "text_encoder" / "config.json"
    if config_path.is_file():
        text_config = json.loads(config_path.read_text(encoding="utf-8"))
        # SD 2.x uses OpenCLIP-H (gelu); SD 1.x OpenAI CLIP-L (quick_gelu).
        if text_config.get("hidden_act") == "gelu":
            return "sd2"
    return "sd1"


def _family_from_checkpoint_keys(path: Path) -> Family:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelSourceError(f"model file '{path}' is not a readable .safetensors checkpoint: {exc}") from exc
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelSourceError(
        f"model file '{path}' holds no Stable Diffusion text encoder keys (looked for "
        f"'cond_stage_model.*' and 'conditioner.embedders.*'); first keys: {keys[:3]}")


def _prediction_type_from_folder(folder: Path) -> str | None:
    config_path = folder / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        return None
    return str(json.loads(config_path.read_text(encoding="utf-8")).get("prediction_type", "epsilon"))


def inspect_model_source(pretrained: str, config_dir: str = "") -> ModelSource:
    """Classify ``pretrained`` and recognise its family without loading weights."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(
                f"model folder '{path}' is not a diffusers pipeline: it has no model_index.json. Expected a "
                f"folder written by save_pretrained (or `dist-lora tiny-model`), or a .safetensors file.")
        return ModelSource(str(path), "folder", _family_from_folder(path), _prediction_type_from_folder(path))
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ModelSourceError(
                f"model file '{path}' is a pickle checkpoint; dist_lora loads only .safetensors (pickles can run "
                f"code). Convert it to .safetensors first.")
        if path.suffix != ".safetensors":
            raise ModelSourceError(f"model file '{path}' is not a .safetensors checkpoint.")
        prediction = None
        if config_dir:
            folder = Path(config_dir).expanduser()
            if not (folder / "model_index.json").is_file():
                raise ModelSourceError(f"model.config_dir '{folder}' is not a diffusers folder (no model_index.json).")
            prediction = _prediction_type_from_folder(folder)
        return ModelSource(str(path), "single_file", _family_from_checkpoint_keys(path), prediction)
    if _HUB_ID.match(pretrained) and not pretrained.startswith((".", "/", "~")):
        return ModelSource(pretrained, "hub", None, None)
    raise ModelSourceError(
        f"model '{pretrained}' does not exist: expected a diffusers folder, a .safetensors checkpoint, or a "
        f"hub id such as 'stabilityai/stable-diffusion-xl-base-1.0'.")


def _dtype_keyword() -> str:
    """diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def _load_pipeline(source: ModelSource, config_dir: str, skip: tuple[str, ...] = (),
                   dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None) -> Any:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    # A component passed as None is not loaded at all (its weights are never read).
    kwargs: dict[str, Any] = dict.fromkeys(skip)
    if source.kind == "single_file":
        cls = StableDiffusionXLPipeline if source.family == "sdxl" else StableDiffusionPipeline
        if config_dir:
            kwargs.update(config=config_dir, local_files_only=True)
        if dtype is not None:
            kwargs[_dtype_keyword()] = dtype
        pipe = cls.from_single_file(source.location, **kwargs)
        if vae_dtype is not None and getattr(pipe, "vae", None) is not None:
            pipe.vae.to(dtype=vae_dtype)
        return pipe
    if dtype is not None:
        # Each component is cast tensor by tensor as it loads: a rank never holds an fp32 copy of a
        # model it will run in bf16 (14 GB of host memory for SDXL).
        kwargs[_dtype_keyword()] = {"default": dtype, "vae": vae_dtype or dtype}
    return DiffusionPipeline.from_pretrained(source.location, **kwargs)


def load_pipeline(pretrained: str, config_dir: str = "") -> tuple[Any, Family]:
    """The whole diffusers pipeline (for merging and sampling) and its recognised family."""
    source = inspect_model_source(pretrained, config_dir)
    pipe = _load_pipeline(source, config_dir)
    family: Family = source.family or ("sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1")
    return pipe, family


def load_vae_and_text(pretrained: str, *, config_dir: str = "", family: str, dtype: torch.dtype | None = None
                      ) -> tuple[nn.Module, list[Any], list[nn.Module]]:
    """The VAE (fp32), tokenizers and text encoders alone, without the UNet: what rendering needs besides
    the trained UNet when training reads cached latents and text-encoder outputs."""
    source = inspect_model_source(pretrained, config_dir)
    pipe = _load_pipeline(source, config_dir, ("unet",), dtype, torch.float32)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return pipe.vae, tokenizers, pipeline_text_encoders(pipe, family)


def pipeline_text_encoders(pipe: Any, family: str) -> list[nn.Module]:
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])


def load_components(pretrained: str, *, config_dir: str = "", family: str = "auto",
                    prediction_type: str = "auto", load_vae: bool = True, load_text: bool = True,
                    dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and a DDPM noise scheduler sharing the model's betas.

    With ``load_vae`` / ``load_text`` false (training from cached latents / text-encoder outputs) those
    components are not read from disk; ``vae`` is then None and the encoder lists are empty. ``dtype``
    (and ``vae_dtype`` for the VAE) load the weights directly in that precision."""
    from diffusers import DDPMScheduler

    source = inspect_model_source(pretrained, config_dir)
    skip = ([] if load_vae else ["vae"]) + ([] if load_text else
                                            ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"])
    pipe = _load_pipeline(source, config_dir, tuple(skip), dtype, vae_dtype)
    detected: Family = source.family or ("sdxl" if "text_encoder_2" in pipe.components else "sd1")
    resolved_family: Family = detected if family == "auto" else family  # type: ignore[assignment]
    tokenizers, encoders = [], []
    if load_text:
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if resolved_family == "sdxl" else [])
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if resolved_family == "sdxl" else [])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolved_prediction = (noise_scheduler.config.prediction_type if prediction_type == "auto"
                           else prediction_type)
    noise_scheduler.register_to_config(prediction_type=resolved_prediction)
    return Components(resolved_family, resolved_prediction, tokenizers, encoders, pipe.vae if load_vae else None,
                      pipe.unet, noise_scheduler)
