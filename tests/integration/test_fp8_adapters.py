"""Every adapter type on an fp8 base (tiny SD 1.5 UNet, attention and 3x3 convolutions adapted): the adapted
model equals the same adapters on a full-precision copy of the base whose weights were rounded to fp8, in
its output and in every adapter gradient, and training it fits a fixed batch. This also checks how DoRA's
norm is computed on such a base: from the weight upcast from fp8 (what the layer applies), not from the
weight it had before rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dist_lora.adapters.inject import adapter_layers, lora_parameters
from dist_lora.adapters.network import attach_network
from dist_lora.config_sections import NetworkConfig
from dist_lora.models.fp8_base import fp8_layers, store_in_fp8
from dist_lora.models.load import load_components
from dist_lora.train.diffusion import diffusion_loss


def _inputs(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([100, 600]),
            "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}


def _adapted(unet: torch.nn.Module, kind: str, family: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(5)
    attach_network(unet, [], family, NetworkConfig(type=kind, rank=4, alpha=2.0, conv_rank=4,
                                                   train_text_encoder=False))
    params = lora_parameters(unet)
    with torch.no_grad():  # every factor non-zero, so that every parameter gets a gradient
        for p in params:
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return params


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_adapters_on_an_fp8_base_equal_them_on_the_rounded_base(kind: str, tiny_models: dict[str, Path]) -> None:
    c = load_components(str(tiny_models["sd15"]), load_vae=False, load_text=False)
    base = c.unet.requires_grad_(False)
    rounded = copy.deepcopy(base)
    with torch.no_grad():
        for module in rounded.modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).float())
    converted = store_in_fp8(base, torch.float32)
    assert converted == len(fp8_layers(base)) > 50
    fp8_params, ref_params = _adapted(base, kind, c.family), _adapted(rounded, kind, c.family)
    assert len(list(adapter_layers(base))) == len(list(adapter_layers(rounded))) > 0
    assert [p.shape for p in fp8_params] == [p.shape for p in ref_params]
    assert len(fp8_layers(base)) == converted  # peft wrapped the fp8 layers and kept them fp8
    x = _inputs(base)
    out, ref = base(**x).sample, rounded(**x).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for p, q in zip(fp8_params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # It trains: a fixed batch is fitted.
    optimizer = torch.optim.AdamW(fp8_params, lr=1e-2)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = diffusion_loss(base(**x).sample, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])
