"""scale_weight_norms against each adapter's delta weight as peft computes it, and against kohya's LoRA
rule (up and down each times sqrt(ratio))."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from torch import nn

from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers
from dist_lora.adapters.max_norm import scale_weight_norms


def _model(config: object) -> nn.Module:
    torch.manual_seed(0)
    base = nn.ModuleDict({"small": nn.Linear(16, 16), "big": nn.Linear(32, 24), "conv": nn.Conv2d(8, 12, 3)})
    model = inject_adapter_in_model(config, base, adapter_name=ADAPTER_NAME)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ADAPTER_NAME in name.split(".") and "base_layer" not in name and "magnitude" not in name:
                # Updates of clearly different sizes: the big and conv modules over the limit, the small under.
                size = 0.02 if ".small." in f".{name}" else 0.5
                p.copy_(size * torch.randn(p.shape, generator=g))
    return model


CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=2, target_modules=["small", "big", "conv"]),
    "dora": LoraConfig(r=4, lora_alpha=2, target_modules=["small", "big", "conv"], use_dora=True),
    "loha": LoHaConfig(r=4, alpha=2, target_modules=["small", "big", "conv"]),
    "lokr": LoKrConfig(r=2, alpha=2, target_modules=["small", "big", "conv"], decompose_both=True,
                       decompose_factor=2),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_updates_over_the_limit_are_shrunk_to_it(kind: str) -> None:
    model = _model(CONFIGS[kind])
    layers = dict(adapter_layers(model))
    before = {n: layer.get_delta_weight(ADAPTER_NAME).detach().clone() for n, layer in layers.items()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {n: d.norm().item() for n, d in before.items()}
    limit = sorted(norms.values())[1] * 0.9  # below two of the three modules, above the smallest
    result = scale_weight_norms(model, limit)
    over = {n for n, v in norms.items() if v > limit}
    assert len(over) == 2 and int(result.modules_scaled) == 2
    for n, layer in layers.items():
        after = layer.get_delta_weight(ADAPTER_NAME)
        if n in over:  # same direction, length exactly the limit
            torch.testing.assert_close(after, before[n] * (limit / norms[n]), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(after, before[n])
    after_norms = [min(v, limit) for v in norms.values()]
    assert result.max_norm.item() == pytest.approx(max(after_norms), rel=1e-5)
    assert result.mean_norm.item() == pytest.approx(sum(after_norms) / 3, rel=1e-5)
    for name, p in model.named_parameters():
        if "magnitude" in name or "base_layer" in name:  # DoRA magnitudes and base weights: untouched
            assert torch.equal(p, params_before[name]), name


def test_lora_factors_scale_by_the_square_root_as_kohya() -> None:
    model = _model(CONFIGS["lora"])
    layer = dict(adapter_layers(model))["big"]
    down, up = layer.lora_A[ADAPTER_NAME].weight.detach().clone(), layer.lora_B[ADAPTER_NAME].weight.detach().clone()
    # kohya: updown = up @ down * alpha / dim, ratio = max_norm / norm, up and down each times sqrt(ratio).
    norm = (up @ down * (2 / 4)).norm()
    limit = float(norm) / 4
    scale_weight_norms(model, limit)
    ratio = limit / norm
    torch.testing.assert_close(layer.lora_A[ADAPTER_NAME].weight, down * ratio.sqrt())
    torch.testing.assert_close(layer.lora_B[ADAPTER_NAME].weight, up * ratio.sqrt())


def test_a_zero_update_is_left_alone() -> None:
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"]), nn.Sequential(nn.Linear(8, 8)),
                                    adapter_name=ADAPTER_NAME)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = scale_weight_norms(model, 1e-3)
    assert int(result.modules_scaled) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
