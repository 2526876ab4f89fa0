"""Memory-related switches: attention kernel selection, and advice when CUDA runs out of memory."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dist_lora.config import Config
from dist_lora.errors import DistLoraError


def xformers_unavailable() -> str:
    if not torch.cuda.is_available():
        return "xformers needs a CUDA GPU"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch/CUDA
        return f"xformers cannot be imported ({type(exc).__name__}: {exc})"
    return ""


def set_attention(unet: nn.Module, backend: str, fallback: bool) -> str:
    """Select the attention kernel; return the one in use ('sdpa' or 'xformers')."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend == "xformers":
        reason = xformers_unavailable()
        if not reason:
            try:
                # diffusers runs a small test kernel here, which fails on GPUs or builds xformers does
                # not support even when the import worked.
                unet.enable_xformers_memory_efficient_attention()  # type: ignore[operator]
                return "xformers"
            except Exception as exc:
                reason = f"xformers' test kernel failed ({type(exc).__name__}: {exc})"
        if not fallback:
            raise DistLoraError(f"training.attention = 'xformers' but {reason}; install xformers for this torch and "
                                f"CUDA, use 'sdpa', or set training.attention_fallback = true.")
        warnings.warn(f"training.attention 'xformers' replaced by PyTorch SDPA: {reason}.", stacklevel=2)
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def out_of_memory_advice(cfg: Config, world_size: int, zero_stage: int) -> str:
    """What to change, from the config actually used, most effective first."""
    t = cfg.training
    tips = []
    if cfg.model.base_dtype != "fp8" and zero_stage != 3:
        tips.append("model.base_dtype=fp8 (the frozen UNet's weights in one byte, upcast per layer as it runs; "
                    "kohya's fp8_base_unet)")
    if t.batch_size > 1:
        tips.append(f"training.batch_size={max(1, t.batch_size // 2)} with "
                    f"training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} (same effective batch)")
    if not t.gradient_checkpointing:
        tips.append("training.gradient_checkpointing=true (about a third more compute, far less activation memory)")
    if t.mixed_precision == "no":
        tips.append("training.mixed_precision=bf16 (or fp16 on GPUs without bf16)")
    if cfg.optimizer.type in ("adamw", "lion"):
        tips.append(f"optimizer.type={'adamw8bit' if cfg.optimizer.type == 'adamw' else 'lion8bit'} "
                    "(8-bit optimizer states)")
    if cfg.network.train_text_encoder:
        tips.append("network.train_text_encoder=false")
    if world_size > 1 and zero_stage < 3:
        tips.append("launch with launch/zero3.yaml (shards the frozen base weights over the GPUs) or "
                    "launch/zero3_offload.yaml")
    tips.append("cache latents and text embeddings ahead of training so the VAE and text encoders stay unloaded")
    if not cfg.model.offload_frozen:
        tips.append("model.offload_frozen=true where they cannot be cached (the VAE and frozen text encoders on the "
                    "GPU only while they encode)")
    return "CUDA ran out of memory. Try, in this order:\n  - " + "\n  - ".join(tips)


# Exit status of a run that ran out of device memory (2 is bad input, 3 non-finite values).
OUT_OF_MEMORY_EXIT_CODE = 4


class OutOfMemory(DistLoraError):
    """CUDA out of memory, with advice computed from the config; the last checkpoint is untouched."""


def cache_out_of_memory_advice(batch_size: int) -> str:
    return (f"CUDA ran out of memory while caching. Try --batch-size {max(1, batch_size // 2)} (now {batch_size}); "
            f"shards already cached are kept and the next run resumes after them.")
