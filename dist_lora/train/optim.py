"""Optimizer and learning-rate schedule construction from the config."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from dist_lora.config import OptimizerConfig, SchedulerConfig


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.type == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer.type {cfg.type!r} is not supported")


def param_groups(unet_params: list[nn.Parameter], text_params: list[nn.Parameter],
                 cfg: OptimizerConfig) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = [{"params": unet_params, "lr": cfg.lr}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.lr})
    return groups


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(cfg.type, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.num_cycles, power=cfg.power)
