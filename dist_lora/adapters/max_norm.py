"""kohya's ``scale_weight_norms``: after each optimizer step, every adapter whose weight update is longer
than a maximum (Frobenius norm of its delta weight, scale included) is shrunk to that length.

The delta weight of every adapter type is multilinear in its factors (LoRA: up @ down; LoHa: two
Hadamard-multiplied products; LoKr: a Kronecker product of full or decomposed factors), so multiplying
each of a module's n factors by ratio^(1/n) multiplies its delta by ratio: for LoRA that is kohya's
sqrt(ratio) on up and down. A DoRA magnitude is not a factor of the update and is left alone (LyCORIS
also measures and scales DoRA's low-rank update alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers


@dataclass(frozen=True)
class NormScaling:
    """What one application did; tensors, read only when logged (no host sync per step)."""

    modules_scaled: torch.Tensor  # how many modules were shrunk
    mean_norm: torch.Tensor  # mean and largest update norm after the scaling (kohya: average/max key norm)
    max_norm: torch.Tensor


def _factors(layer: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in layer.named_parameters()
            if ADAPTER_NAME in name.split(".") and "base_layer" not in name and "magnitude" not in name]


@torch.no_grad()
def scale_weight_norms(model: nn.Module, max_norm: float) -> NormScaling:
    """Shrink every adapter of ``model`` whose update norm exceeds ``max_norm`` to exactly that norm, as
    kohya's apply_max_norm_regularization does (ratio = min(norm, max_norm) / max(norm, max_norm / 2))."""
    layers = [layer for _, layer in adapter_layers(model)]
    norms = torch.stack([layer.get_delta_weight(ADAPTER_NAME).float().norm() for layer in layers])
    clamped = norms.clamp(min=max_norm / 2)
    ratios = clamped.clamp(max=max_norm) / clamped
    for layer, ratio in zip(layers, ratios, strict=True):
        factors = _factors(layer)
        share = ratio ** (1.0 / len(factors))
        for p in factors:
            p.mul_(share.to(p.dtype))  # x 1.0 where the module is within the limit: bit for bit unchanged
    after = norms * ratios
    return NormScaling((ratios != 1).sum(), after.mean(), after.max())
