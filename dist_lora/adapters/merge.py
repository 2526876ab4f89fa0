"""Baking adapters into base weights, each at a multiplier (the ``<lora:name:w>`` weight).

Non-DoRA adapters: ``W + w * dW``. DoRA: ``W + w * (W_dora - W)`` with
``W_dora = m * (W + dW) / ||W + dW||`` (norms per output row or per input column, as the magnitude is
kept), which is how AUTOMATIC1111 and ComfyUI apply a DoRA file at strength ``w`` (LyCORIS' own runtime
interpolates from ``W + dW`` instead; both agree at ``w = 1``). ``dW`` comes from peft's own
``get_delta_weight`` after the file is loaded onto the model. OFT/BOFT: the weight rotated at multiplier
``w`` (see ``orthogonal``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dist_lora.adapters.dora_axis import column_norm, is_input_axis
from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers
from dist_lora.adapters.io import apply_adapter_file
from dist_lora.adapters.oft_layer import OrthogonalLayer


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


def merged_weight(layer: nn.Module, multiplier: float) -> torch.Tensor:
    if isinstance(layer, OrthogonalLayer):
        return layer.merged_weight(multiplier, ADAPTER_NAME)
    base = layer.get_base_layer().weight.detach().float()
    delta = layer.get_delta_weight(ADAPTER_NAME).detach().float().reshape(base.shape)
    if isinstance(layer, LoraLayer) and is_input_axis(layer, ADAPTER_NAME):
        combined = base + delta
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach().float()
        scale = magnitude / column_norm(combined)
        dora = combined * scale.reshape(1, -1, *([1] * (base.dim() - 2)))
        return base + multiplier * (dora - base)
    if isinstance(layer, LoraLayer) and layer.use_dora.get(ADAPTER_NAME):
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach().float().reshape(base.shape[0], -1)
        combined = base + delta
        dora = combined * (magnitude.reshape(_row_norm(combined).shape) / _row_norm(combined))
        return base + multiplier * (dora - base)
    return base + multiplier * delta


def bake_adapters(model: nn.Module, multiplier: float) -> int:
    """Replace every adapted layer of ``model`` by its base layer holding the merged weight."""
    layers = list(adapter_layers(model))
    for path, layer in layers:
        new_weight = merged_weight(layer, multiplier)
        base = layer.get_base_layer()
        with torch.no_grad():
            base.weight.copy_(new_weight.to(base.weight.dtype))
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, base)
    return len(layers)


def merge_files(unet: nn.Module, text_encoders: list[nn.Module], family: str,
                files: list[tuple[str | Path, float]]) -> list[int]:
    """Apply each (file, multiplier) in turn; each is baked before the next is loaded."""
    counts = []
    for path, multiplier in files:
        apply_adapter_file(path, unet, text_encoders, family)
        counts.append(sum(bake_adapters(m, multiplier) for m in [unet, *text_encoders]))
    return counts
