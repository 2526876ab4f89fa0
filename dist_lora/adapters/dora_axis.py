"""DoRA with its magnitude per input column: the convention AUTOMATIC1111 and ComfyUI apply exactly.

peft's DoRA keeps one magnitude per output row (``dora_scale`` ``[out, 1]``). AUTOMATIC1111 always
normalises over the input axis, and ComfyUI divides an output-axis scale by the norm of the base weight
instead of the adapted one, so neither applies such a file as it was trained. With one magnitude per
input column (``dora_scale`` ``[1, in]``, LyCORIS' ``wd_on_output = False``) both compute

    W' = (W + s B A) * m / ||W + s B A||_col

which is what this module trains. Because the factor ``c = m / ||.||_col`` scales input columns, the
layer computes it on its input: ``W' x = W (c x) + s B A (c x)``. As in peft (and the DoRA paper) the
norm is treated as a constant in the backward pass.

The module takes the place of peft's per-row ``DoraLinearLayer`` / ``DoraConv2dLayer`` inside a peft
LoRA layer (``lora_magnitude_vector[adapter]``) and is called the same way, so everything that walks
peft layers (parameters, LoRA+, EMA, checkpoints) sees the same names: ``lora_magnitude_vector.<adapter>
.weight``, here of shape ``[in]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.utils.integrations import dequantize_module_weight
from torch import nn


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a Linear ``[out, in]`` or Conv2d ``[out, in, k, k]`` weight: ``[in]``."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def lora_weight(lora_A: nn.Module, lora_B: nn.Module, shape: torch.Size) -> torch.Tensor:
    """``B @ A`` in the base weight's shape (a conv's down projection carries the kernel)."""
    a, b = lora_A.weight, lora_B.weight  # type: ignore[union-attr]
    rank = a.shape[0]
    return (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(shape)


class InputAxisDora(nn.Module):
    """The magnitude ``m`` (``[in]``) of one DoRA adapter, and the extra output it adds to the base layer's."""

    def __init__(self, base_layer: nn.Module, lora_A: nn.Module, lora_B: nn.Module, scaling: float) -> None:
        super().__init__()
        base_weight = dequantize_module_weight(base_layer).detach()
        delta = lora_weight(lora_A, lora_B, base_weight.shape).detach().to(base_weight.dtype)
        # Starts at the adapted weight's own column norms: the layer begins as W + s B A (W, with B = 0).
        self.weight = nn.Parameter(column_norm((base_weight + scaling * delta).float()))

    def input_scale(self, base_layer: nn.Module, lora_A: nn.Module, lora_B: nn.Module,
                    scaling: float) -> torch.Tensor:
        """``c = m / ||W + s B A||_col``, per input feature (the norm without gradient)."""
        weight = dequantize_module_weight(base_layer)
        with torch.no_grad():
            adapted = weight.float() + scaling * lora_weight(lora_A, lora_B, weight.shape).float()
            norm = column_norm(adapted)
        return self.weight / norm

    def forward(self, x: torch.Tensor, *, lora_A: nn.Module, lora_B: nn.Module, scaling: float,
                base_layer: nn.Module, base_result: torch.Tensor | None = None,
                adapter_name: str = "default") -> torch.Tensor:
        """What to add to ``base_layer(x)``: ``W((c - 1) x) + s B A (c x)`` (the bias is unchanged)."""
        scale = self.input_scale(base_layer, lora_A, lora_B, scaling).to(x.dtype)
        # A quantised base (nf4 / int8) is dequantised: W is the weight the layer applies.
        weight = dequantize_module_weight(base_layer)
        if isinstance(base_layer, nn.Conv2d):
            scale = scale.view(1, -1, 1, 1)
            base_change = F.conv2d(x * (scale - 1), weight.to(x.dtype), None, base_layer.stride, base_layer.padding,
                                   base_layer.dilation, base_layer.groups)
        else:
            base_change = F.linear(x * (scale - 1), weight.to(x.dtype))
        return base_change + lora_B(lora_A(x * scale)) * scaling


def use_input_axis(layer: nn.Module, adapter_name: str) -> None:
    """Swap a peft DoRA layer's per-row magnitude for a per-column one (before training starts)."""
    layer.lora_magnitude_vector[adapter_name] = InputAxisDora(  # type: ignore[index]
        layer.get_base_layer(), layer.lora_A[adapter_name], layer.lora_B[adapter_name],  # type: ignore[index, operator]
        float(layer.scaling[adapter_name]))  # type: ignore[index]


def is_input_axis(layer: nn.Module, adapter_name: str) -> bool:
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    return magnitudes is not None and adapter_name in magnitudes \
        and isinstance(magnitudes[adapter_name], InputAxisDora)
