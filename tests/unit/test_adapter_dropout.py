"""kohya's rank and module dropout, with masks drawn from each sample's generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.adapters.dropout import AdapterDropout
from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers, add_network
from dist_lora.adapters.targets import ModuleRank, TargetPlan

RANK_P, MODULE_P = 0.3, 0.25


def _model() -> tuple[nn.ModuleDict, list[nn.Module]]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"tokens": nn.Linear(8, 6), "conv": nn.Conv2d(3, 4, 3, padding=1)})
    add_network(model, "lora", TargetPlan({"tokens": ModuleRank(4, 2.0), "conv": ModuleRank(3, 3.0)}))
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[ADAPTER_NAME].weight.normal_()
    return model, layers


def _generators(indices: range) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in indices]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"tokens": torch.randn(4, 5, 8, generator=g), "conv": torch.randn(4, 3, 6, 6, generator=g)}


def _by_hand(model: nn.ModuleDict, layers: list[nn.Module], x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's LoRAModule.forward, sample by sample, with each sample's uniform draws laid out as
    [rank channels of every layer..., one per layer]."""
    ranks = [int(layer.r[ADAPTER_NAME]) for layer in layers]
    out = {}
    for (name, layer), (offset, rank) in zip(zip(("tokens", "conv"), layers, strict=True),
                                             ((0, ranks[0]), (ranks[0], ranks[1])), strict=True):
        base, down = layer.get_base_layer(), layer.lora_A[ADAPTER_NAME]
        up, scale = layer.lora_B[ADAPTER_NAME], layer.scaling[ADAPTER_NAME]
        rows = []
        for i, g in enumerate(_generators(range(4))):
            u = torch.rand(sum(ranks) + len(ranks), generator=g)
            xi = x[name][i:i + 1]
            lx = down(xi)
            mask = (u[offset:offset + rank] > RANK_P).float()
            lx = lx * (mask.view(1, -1, 1, 1) if lx.dim() == 4 else mask)
            skipped = u[sum(ranks) + ("tokens", "conv").index(name)] < MODULE_P
            lora = torch.zeros_like(base(xi)) if skipped else up(lx) * scale / (1 - RANK_P)
            rows.append(base(xi) + lora)
        out[name] = torch.cat(rows)
    return out


def test_masks_follow_kohyas_forward_sample_by_sample() -> None:
    model, layers = _model()
    dropout = AdapterDropout(layers, RANK_P, MODULE_P)
    x = _inputs()
    with torch.no_grad():
        expected = _by_hand(model, layers, x)
        clean = {name: model[name](x[name]) for name in x}  # no masks drawn yet: nothing is dropped
        dropout.draw(_generators(range(4)), torch.device("cpu"))
        got = {name: model[name](x[name]) for name in x}
        for name in x:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
            assert (got[name] - clean[name]).abs().max() > 1e-3
        base = layers[0].get_base_layer()
        skipped = [i for i in range(4) if torch.allclose(got["tokens"][i], F.linear(x["tokens"][i], base.weight,
                                                                                      base.bias))]
        assert len(skipped) < 4  # not every sample skipped the module


def test_a_sample_gets_its_masks_whatever_batch_it_is_in() -> None:
    model, layers = _model()
    dropout = AdapterDropout(layers, RANK_P, MODULE_P)
    x = _inputs()
    with torch.no_grad():
        dropout.draw(_generators(range(4)), torch.device("cpu"))
        whole = {name: model[name](x[name]) for name in x}
        halves = {}
        for name in x:
            parts = []
            for first in (0, 2):
                dropout.draw(_generators(range(first, first + 2)), torch.device("cpu"))
                parts.append(model[name](x[name][first:first + 2]))
            halves[name] = torch.cat(parts)
        for name in x:
            torch.testing.assert_close(halves[name], whole[name], atol=1e-6, rtol=1e-6)


def test_evaluation_is_never_masked_and_a_wrong_batch_is_an_error() -> None:
    model, layers = _model()
    x = _inputs()
    with torch.no_grad():
        clean = {name: model[name](x[name]) for name in x}
        dropout = AdapterDropout(layers, RANK_P, MODULE_P)
        dropout.draw(_generators(range(4)), torch.device("cpu"))
        model.eval()
        for name in x:
            torch.testing.assert_close(model[name](x[name]), clean[name])
        model.train()
        with pytest.raises(RuntimeError, match="drawn for 4 samples but a layer ran on 2"):
            model["tokens"](x["tokens"][:2])


def test_rates_over_many_samples() -> None:
    _, layers = _model()
    dropout = AdapterDropout(layers, RANK_P, MODULE_P)
    dropout.draw(_generators(range(4000)), torch.device("cpu"))
    assert dropout._rank_masks is not None and dropout._keep is not None
    kept_channels = torch.cat(dropout._rank_masks, dim=1).gt(0).float().mean()
    assert abs(kept_channels - (1 - RANK_P)) < 0.02
    assert abs(dropout._keep.mean() - (1 - MODULE_P)) < 0.02
    # kohya's scaling: a kept channel carries 1 / (1 - p).
    assert torch.cat(dropout._rank_masks, dim=1).max() == pytest.approx(1 / (1 - RANK_P))
