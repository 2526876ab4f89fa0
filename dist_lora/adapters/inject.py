"""Putting LoRA adapters on modules (through peft) and reading them back as per-module tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from dist_lora.errors import DistLoraError

ADAPTER_NAME = "default"


def add_lora(model: nn.Module, target_modules: Sequence[str], rank: int, alpha: float,
             dropout: float = 0.0) -> int:
    """Inject LoRA into every module whose name ends with one of ``target_modules``; return how many.

    The down projection starts Gaussian and the up projection at zero, so training starts from the
    unchanged base model (as kohya and diffusers do).
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights="gaussian")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    count = sum(1 for _ in lora_layers(model))
    if count == 0:
        raise DistLoraError(f"no module matched the target modules {list(target_modules)}; module names end "
                            "like to_q or ff.net.0.proj (UNet), q_proj (text encoder).")
    return count


@dataclass
class LoraTensors:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    rank: int


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name, module


def read_lora(model: nn.Module) -> dict[str, LoraTensors]:
    """Module path -> its adapter tensors (detached), for every LoRA layer of ``model``."""
    out: dict[str, LoraTensors] = {}
    for name, layer in lora_layers(model):
        out[name] = LoraTensors(layer.lora_A[ADAPTER_NAME].weight.detach(), layer.lora_B[ADAPTER_NAME].weight.detach(),
                                float(layer.lora_alpha[ADAPTER_NAME]), int(layer.r[ADAPTER_NAME]))
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]
