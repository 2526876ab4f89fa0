"""The fp8 frozen base: each layer equals the same layer with its weight rounded to float8_e4m3fn, gradients
reach the input through it, nothing of compute-dtype weight size is saved for backward, and casts of the
module leave the storage alone.

The rounding bound: e4m3 keeps 3 mantissa bits, so a normal weight w is stored as w(1 + d) with |d| <= 2^-4
(half a unit in the last place); weights under 2^-6 (the smallest normal) are subnormal and are off by at
most half the subnormal step, 2^-10. A layer's output is a sum of products x_i w_i, so its error is at most
sum_i |x_i| (2^-4 |w_i| + 2^-10), which the tests check element by element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.config_sections import ModelConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.fp8_base import check_base_dtype, fp8_layers, store_in_fp8

RELATIVE, ABSOLUTE = 2.0**-4, 2.0**-10


def _rounded(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float8_e4m3fn).to(w.dtype)


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)


# Small, and full-size SDXL layers: the transformer feed-forward's GEGLU projection 1280 -> 10240.
@pytest.mark.parametrize(("features_in", "features_out"), [(64, 48), (1280, 10240)])
def test_linear_equals_the_rounded_weight_and_stays_in_the_format_bound(features_in: int, features_out: int) -> None:
    torch.manual_seed(0)
    layer = _frozen(nn.Linear(features_in, features_out))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(5, features_in, requires_grad=True)
    assert store_in_fp8(layer, torch.float32) == 1 and layer.weight_fp8.dtype == torch.uint8
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, _rounded(w), b), rtol=0, atol=1e-5)
    bound = x.detach().abs() @ (RELATIVE * w.abs() + ABSOLUTE).T
    assert ((y - F.linear(x, w, b)).abs() <= bound + 1e-5).all()
    # The gradient reaches the input through the upcast weight.
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, _rounded(w), b).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


# The last case is a full-size SDXL ResNet convolution, 1280 -> 1280, 3x3.
@pytest.mark.parametrize(("channels", "stride", "padding", "groups"),
                         [(8, 1, 1, 1), (8, 2, 1, 1), (8, 1, 0, 4), (1280, 1, 1, 1)])
def test_conv_equals_the_rounded_weight_with_its_input_gradient(channels: int, stride: int, padding: int,
                                                                groups: int) -> None:
    torch.manual_seed(1)
    out_channels = 12 if channels == 8 else channels
    layer = _frozen(nn.Conv2d(channels, out_channels, 3, stride=stride, padding=padding, groups=groups))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(2 if channels == 8 else 1, channels, 9, 9, requires_grad=True)
    store_in_fp8(layer, torch.float32)
    y = layer(x)
    reference = F.conv2d(x.detach(), _rounded(w), b, stride, padding, 1, groups)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-4)
    bound = F.conv2d(x.detach().abs(), RELATIVE * w.abs() + ABSOLUTE, None, stride, padding, 1, groups)
    assert ((y - F.conv2d(x.detach(), w, b, stride, padding, 1, groups)).abs() <= bound + 1e-4).all()
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.conv2d(x_ref, _rounded(w), b, stride, padding, 1, groups).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_backward_keeps_only_the_fp8_bits_of_the_weight() -> None:
    """Autograd must not hold a compute-dtype copy of each weight until the backward pass."""
    torch.manual_seed(2)
    model = _frozen(nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)))
    store_in_fp8(model, torch.float32)
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    weights = [t for t in saved if t.shape == (256, 256)]
    assert weights and all(t.dtype == torch.uint8 for t in weights), [t.dtype for t in weights]
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_autocast_computes_in_the_autocast_dtype() -> None:
    torch.manual_seed(3)
    layer = _frozen(nn.Linear(32, 16))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    store_in_fp8(layer, torch.float32)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        reference = F.linear(x, _rounded(w), b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference)


def test_module_casts_leave_the_storage_and_halve_the_bytes() -> None:
    model = _frozen(nn.Sequential(nn.Linear(128, 128), nn.Conv2d(4, 8, 3)))
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters() if p.ndim > 1)
    store_in_fp8(model, torch.bfloat16)
    model.to(torch.bfloat16)
    model.half()
    stored = [m.weight_fp8 for m in fp8_layers(model)]
    assert len(stored) == 2 and all(t.dtype == torch.uint8 for t in stored)
    assert sum(t.numel() * t.element_size() for t in stored) * 2 == bf16_bytes
    assert model[0].weight.dtype == torch.bfloat16  # read upcast, to the compute dtype
    with pytest.raises(DistLoraError, match="frozen"):
        model[0].weight = torch.zeros(128, 128)


def test_trainable_layers_are_not_converted() -> None:
    model = nn.Sequential(_frozen(nn.Linear(8, 8)), nn.Linear(8, 8))
    assert store_in_fp8(model, torch.float32) == 1
    assert type(model[1]) is nn.Linear


def test_bad_combinations_are_refused_before_loading() -> None:
    with pytest.raises(DistLoraError, match=r"model.fp8_text_encoders = true .* model.base_dtype = 'fp8'"):
        check_base_dtype(ModelConfig(pretrained="x", fp8_text_encoders=True), zero_stage=0)
    with pytest.raises(DistLoraError, match="ZeRO-3"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="fp8"), zero_stage=3)
    check_base_dtype(ModelConfig(pretrained="x", base_dtype="fp8", fp8_text_encoders=True), zero_stage=2)
    with pytest.raises(DistLoraError, match=r"model.base_dtype = 'nf4'.*ZeRO-3"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="nf4"), zero_stage=3)
    with pytest.raises(DistLoraError, match=r"'int8' \(bitsandbytes layers\) is tested under DDP only"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="int8"), zero_stage=2)
    with pytest.raises(DistLoraError, match=r"fp8_text_encoders = true .* model.base_dtype = 'nf4'"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="nf4", fp8_text_encoders=True), zero_stage=0)
    check_base_dtype(ModelConfig(pretrained="x", base_dtype="nf4"), zero_stage=0, network_type="dora")
    for kind in ("loha", "lokr"):
        with pytest.raises(DistLoraError, match=rf"'nf4' with network.type = '{kind}'"):
            check_base_dtype(ModelConfig(pretrained="x", base_dtype="nf4"), zero_stage=0, network_type=kind)
    with pytest.raises(DistLoraError, match=r"'int8' with network.type = 'dora'"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="int8"), zero_stage=0, network_type="dora")


def test_a_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import then fails, as without the package
    with pytest.raises(DistLoraError, match=r"'nf4' quantises the frozen base with bitsandbytes, which is not"):
        check_base_dtype(ModelConfig(pretrained="x", base_dtype="nf4"), zero_stage=0)
