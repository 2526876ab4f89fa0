"""nf4 / int8 frozen linears through bitsandbytes: each layer applies its dequantised weight, that weight is
within the format's rounding of the original, and the input gradient flows through it.

Bounds. NF4 stores each weight as one of 16 levels in [-1, 1] times its block's absmax (blocks of 64); int8
(LLM.int8, vector-wise) stores about 127 w / absmax_row as an integer. bitsandbytes' quantisers do not always
pick the nearest level (measured here: up to 0.152 x absmax for nf4, where the nearest level would give at
most half the widest gap, 0.1385; up to 0.53 of an int8 step), so the bound asserted is one full step: the
widest NF4 gap, 1 - 0.7230 = 0.2770 x the block's absmax, and absmax_row / 127 for int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from dist_lora.models.quantized_base import quantizable_params, quantize_linears, quantized_layers

NF4_WIDEST_GAP = 1.0 - 0.7229568362236023


def _bound(weight: torch.Tensor, base_dtype: str) -> torch.Tensor:
    if base_dtype == "nf4":
        blocks = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        return (NF4_WIDEST_GAP * blocks).expand(-1, 64).reshape(weight.shape) + 1e-6
    return weight.abs().amax(dim=1, keepdim=True) / 127 + 1e-6


@pytest.mark.parametrize("base_dtype", ["nf4", "int8"])
@pytest.mark.parametrize(("features_in", "features_out"), [(256, 128), (1280, 5120)])
def test_a_quantised_linear_applies_its_dequantised_weight(base_dtype: str, features_in: int,
                                                           features_out: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features_in, features_out)).requires_grad_(False)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert quantizable_params(model) == w.numel()
    assert quantize_linears(model, base_dtype, torch.float32, torch.device("cpu")) == 1
    (layer,) = quantized_layers(model)
    stored = layer.weight.data
    assert stored.dtype == (torch.uint8 if base_dtype == "nf4" else torch.int8)
    assert stored.numel() * stored.element_size() == w.numel() // (2 if base_dtype == "nf4" else 1)
    dequantised = dequantize_module_weight(layer).float()
    assert ((dequantised - w).abs() <= _bound(w, base_dtype)).all()
    x = torch.randn(3, features_in, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(y, F.linear(x, dequantised, b), rtol=2e-3, atol=2e-3)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, dequantised, b).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=5e-3, atol=5e-3)


def test_convolutions_and_trained_layers_stay_as_they_are() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 8).requires_grad_(False), nn.Linear(8, 8))
    model[0].requires_grad_(False)
    assert quantize_linears(model, "nf4", torch.float32, torch.device("cpu")) == 1
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear
