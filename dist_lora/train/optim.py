"""Optimizer and learning-rate schedule construction from the config.

8-bit and Lion optimizers come from bitsandbytes. Where bitsandbytes cannot run (not installed, or a
device it has no kernels for, such as Apple's MPS) the closest full-precision optimizer is used
instead, with one warning naming both; the choice actually made is reported to the caller, which
records it in the metrics and the adapter's metadata.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from dist_lora.config import OptimizerConfig, SchedulerConfig, parse_override
from dist_lora.errors import DistLoraError
from dist_lora.train.optimizer_classes import BUILT_IN, build_named_optimizer

BITSANDBYTES_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion", "lion8bit")
_BITSANDBYTES = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion": "Lion", "lion8bit": "Lion8bit"}
_FALLBACK = {"adamw8bit": "adamw", "paged_adamw8bit": "adamw", "lion": "lion_torch", "lion8bit": "lion_torch"}


@dataclass(frozen=True)
class OptimizerChoice:
    requested: str
    used: str  # the class actually built, e.g. "bitsandbytes.optim.AdamW8bit"
    fallback_reason: str = ""


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya-style ``key=value`` strings (values read as TOML): ``["weight_decay=0.1", "betas=[0.9, 0.99]"]``."""
    out: dict[str, Any] = {}
    for item in items:
        (_, key), value = parse_override(f"optimizer.{item}") if "=" in item else ((None, item), None)
        if value is None:
            raise DistLoraError(f"optimizer.args entry '{item}' is not key=value, e.g. 'betas=[0.9, 0.99]'.")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def bitsandbytes_unavailable(device: torch.device) -> str:
    """Why bitsandbytes cannot serve this device ('' when it can)."""
    if device.type == "mps":
        return "bitsandbytes has no kernels for Apple MPS"
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        return "bitsandbytes is disabled in this process"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a failing native library
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    return ""


def _base_kwargs(kind: str, cfg: OptimizerConfig) -> dict[str, Any]:
    if kind.startswith("lion"):
        return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay}
    if kind == "adafactor":
        return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "scale_parameter": False, "relative_step": False,
                "warmup_init": False}
    return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def _construct(kind: str, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    if kind in _BITSANDBYTES:
        import bitsandbytes as bnb

        from dist_lora.train.bnb_step import without_per_parameter_sync

        name = _BITSANDBYTES[kind]
        return without_per_parameter_sync(getattr(bnb.optim, name)(groups, **kwargs)), f"bitsandbytes.optim.{name}"
    if kind == "adamw":
        return torch.optim.AdamW(groups, **kwargs), "torch.optim.AdamW"
    if kind == "lion_torch":
        from dist_lora.train.lion import Lion

        return Lion(groups, **kwargs), "dist_lora.train.lion.Lion"
    if kind == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **kwargs), "prodigyopt.Prodigy"
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, **kwargs), "transformers.optimization.Adafactor"
    raise DistLoraError(f"optimizer.type {kind!r} is not supported")


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimizerConfig,
                    device: torch.device | None = None) -> tuple[torch.optim.Optimizer, OptimizerChoice]:
    kind, reason = cfg.type, ""
    if kind in _BITSANDBYTES:
        reason = bitsandbytes_unavailable(device or torch.device("cpu"))
        if reason:
            kind = _FALLBACK[kind]
    if kind not in (*BUILT_IN, "lion_torch"):  # CAME, ADOPT, Muon, Schedule-Free AdamW, or an import path
        optimizer, used = build_named_optimizer(kind, param_groups, cfg, parse_optimizer_args(cfg.args))
        return optimizer, OptimizerChoice(cfg.type, used)
    kwargs = {**_base_kwargs(kind, cfg), **parse_optimizer_args(cfg.args)}
    try:
        optimizer, used = _construct(kind, param_groups, kwargs)
    except TypeError as exc:
        raise DistLoraError(f"optimizer.args {cfg.args} do not fit {kind}: {exc}") from exc
    if reason:
        warnings.warn(f"optimizer '{cfg.type}' replaced by {used}: {reason}.", stacklevel=2)
    return optimizer, OptimizerChoice(cfg.type, used, reason)


@dataclass(frozen=True)
class TrainedParameters:
    """The adapter parameters of the UNet and of the trained text encoders, with the LoRA up projections
    among them (LoRA+ gives those ``ratio`` times the learning rate; a ratio of 0 leaves them alone)."""

    unet: list[nn.Parameter]
    text: list[nn.Parameter]
    unet_up: list[nn.Parameter] = field(default_factory=list)
    text_up: list[nn.Parameter] = field(default_factory=list)
    unet_ratio: float = 0.0
    text_ratio: float = 0.0
    # kohya's per-block learning-rate weights of UNet parameters, by id(); absent means 1.
    unet_lr_weights: dict[int, float] = field(default_factory=dict)


def param_groups(params: TrainedParameters, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Optimizer groups: UNet, then text encoders. Each is split by learning rate: the UNet's by block
    weight, and with LoRA+ the up projections at ``ratio`` times the rest; groups come in the order of
    their first parameter."""
    groups: list[dict[str, Any]] = []
    for members, up, ratio, lr, weights in (
            (params.unet, params.unet_up, params.unet_ratio, cfg.lr, params.unet_lr_weights),
            (params.text, params.text_up, params.text_ratio, cfg.text_encoder_lr or cfg.lr, {})):
        boosted = {id(p) for p in up} if ratio > 0 else set()
        by_rate: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for p in members:
            by_rate.setdefault((weights.get(id(p), 1.0), id(p) in boosted), []).append(p)
        groups.extend({"params": members_at, "lr": lr * weight * (ratio if plus else 1.0)}
                      for (weight, plus), members_at in by_rate.items())
    return groups


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(cfg.type, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.num_cycles, power=cfg.power)
