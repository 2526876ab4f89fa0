"""Every adapter type on an fp8, nf4 or int8 base (tiny SD 1.5 UNet, attention and 3x3 convolutions adapted):
the adapted model equals the same adapters on a full-precision copy of the base whose weights were replaced
by what the stored format gives back (rounded to fp8, dequantised from nf4 / int8), in its output and in
every adapter gradient, and training it fits a fixed batch. This also checks how DoRA's norm is computed on
such a base: from the weight the layer applies (upcast or dequantised), not from the original weight."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft.utils.integrations import dequantize_module_weight

from dist_lora.adapters.inject import adapter_layers, lora_parameters
from dist_lora.adapters.network import attach_network
from dist_lora.config_sections import NetworkConfig
from dist_lora.models.fp8_base import fp8_layers, store_in_fp8
from dist_lora.models.load import load_components
from dist_lora.models.quantized_base import quantize_linears, quantized_layers
from dist_lora.train.diffusion import diffusion_loss


def _inputs(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([100, 600]),
            "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}


def _adapted(unet: torch.nn.Module, kind: str, family: str) -> dict[str, torch.nn.Parameter]:
    torch.manual_seed(5)
    attach_network(unet, [], family, NetworkConfig(type=kind, rank=4, alpha=2.0, conv_rank=4,
                                                   train_text_encoder=False))
    trained = {id(p) for p in lora_parameters(unet)}
    # By name: peft's quantised-layer wrappers register their parameters in another order.
    params = dict(sorted((n, p) for n, p in unet.named_parameters() if id(p) in trained))
    with torch.no_grad():  # every factor non-zero, so that every parameter gets a gradient
        for p in params.values():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return params


CASES = [*(("fp8", k) for k in ("lora", "locon", "loha", "lokr", "dora", "oft")),
         *(("nf4", k) for k in ("lora", "locon", "dora", "oft")), ("int8", "lora"), ("int8", "loha"), ("int8", "boft")]


@pytest.mark.parametrize(("base_dtype", "kind"), CASES)
def test_adapters_on_a_low_precision_base_equal_them_on_the_same_weights(base_dtype: str, kind: str,
                                                                         tiny_models: dict[str, Path]) -> None:
    c = load_components(str(tiny_models["sd15"]), load_vae=False, load_text=False)
    base = c.unet.requires_grad_(False)
    rounded = copy.deepcopy(base)
    if base_dtype == "fp8":
        converted = store_in_fp8(base, torch.float32)
        assert converted == len(fp8_layers(base)) > 50
    else:
        converted = quantize_linears(base, base_dtype, torch.float32, torch.device("cpu"))
        assert converted == len(quantized_layers(base)) > 50
    stored = dict(base.named_modules())
    with torch.no_grad():  # the reference holds what the stored format gives back
        for name, module in rounded.named_modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and name in stored and \
                    type(stored[name]) is not type(module):
                module.weight.copy_(dequantize_module_weight(stored[name]).float())
    fp8_params, ref_params = _adapted(base, kind, c.family), _adapted(rounded, kind, c.family)
    assert len(list(adapter_layers(base))) == len(list(adapter_layers(rounded))) > 0
    assert {n: p.shape for n, p in fp8_params.items()} == {n: p.shape for n, p in ref_params.items()}
    # peft wrapped the stored layers and kept them as they were
    assert len(fp8_layers(base) if base_dtype == "fp8" else quantized_layers(base)) == converted
    x = _inputs(base)
    out, ref = base(**x).sample, rounded(**x).sample
    tolerance = 1e-5 if base_dtype == "fp8" else 2e-3  # bitsandbytes' CPU kernels compute in their own order
    torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
    out.square().mean().backward()
    ref.square().mean().backward()
    for name, p in fp8_params.items():
        q = ref_params[name]
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4 if base_dtype == "fp8" else 2e-2,
                                   atol=1e-6 if base_dtype == "fp8" else 1e-4)
    # It trains: a fixed batch is fitted.
    optimizer = torch.optim.AdamW(list(fp8_params.values()), lr=1e-2)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = diffusion_loss(base(**x).sample, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])
