"""Input-axis DoRA: what AUTOMATIC1111, ComfyUI and LyCORIS compute from our file is what our layer computes.

The loaders' formulas are restated here from their code's documented behaviour (AUTOMATIC1111's
``NetworkModule.apply_weight_decompose`` + ``finalize_updown``, ComfyUI's ``weight_decompose``);
LyCORIS is run as its own module (``LoConModule`` with ``wd_on_out=False``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.adapters.dora_axis import InputAxisDora
from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers, add_network
from dist_lora.adapters.merge import merged_weight
from dist_lora.adapters.targets import ModuleRank, TargetPlan
from dist_lora.adapters.tensors import ModuleAdapter, read_adapters


def _a1111_delta(weight: torch.Tensor, f: ModuleAdapter, multiplier: float) -> torch.Tensor:
    """AUTOMATIC1111: decompose W + up @ down (unscaled), then scale the change by alpha/dim x multiplier;
    the norm is always over the input axis."""
    up, down, scale = f.tensors["lora_up.weight"], f.tensors["lora_down.weight"], f.tensors["dora_scale"]
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
    merged = updown + weight
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
    return (merged * (scale / norm) - weight) * (f.alpha / down.shape[0]) * multiplier


def _comfyui_delta(weight: torch.Tensor, f: ModuleAdapter, strength: float) -> torch.Tensor:
    """ComfyUI: W + s up @ down; the norm per output row of W when dora_scale has W's rows, else per input
    column of the adapted weight; at strength w, W + w (W_dora - W)."""
    up, down, scale = f.tensors["lora_up.weight"], f.tensors["lora_down.weight"], f.tensors["dora_scale"]
    diff = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
    calc = weight + diff * (f.alpha / down.shape[0])
    if scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0],
                                                                                      *[1] * (weight.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    calc = calc * (scale / (norm + torch.finfo(weight.dtype).eps))
    return strength * (calc - weight)


def _lycoris_delta(base: nn.Module, f: ModuleAdapter) -> torch.Tensor:
    from lycoris.modules.locon import LoConModule

    down = f.tensors["lora_down.weight"]
    module = LoConModule("m", base, 1.0, down.shape[0], f.alpha, weight_decompose=True, wd_on_out=False)
    with torch.no_grad():
        module.lora_down.weight.copy_(down)
        module.lora_up.weight.copy_(f.tensors["lora_up.weight"])
        module.dora_scale.copy_(f.tensors["dora_scale"])
    return module.get_merged_weight(multiplier=1)[0] - base.weight


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"linear": nn.Linear(12, 10), "conv": nn.Conv2d(6, 5, 3, padding=1)}


def _apply(base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    weight = base.weight + delta
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, base.bias, padding=1)
    return F.linear(x, weight, base.bias)


def _trained(axis: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Both layers with a DoRA adapter (rank 4, alpha 2: scale 1/2) whose factors and magnitude moved."""
    model = nn.ModuleDict(_layers())
    add_network(model, "dora", TargetPlan({"linear": ModuleRank(4, 2.0), "conv": ModuleRank(4, 2.0)}),
                dora_axis=axis)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
            magnitude.mul_(1 + 0.3 * torch.randn(magnitude.shape, generator=generator))
    return model, _layers()


def _inputs(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    shape = (3, 12) if name == "linear" else (2, 6, 7, 7)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("name", ["linear", "conv"])
def test_every_loader_applies_the_trained_change(name: str) -> None:
    model, bases = _trained("input")
    layer = dict(adapter_layers(model))[name]
    assert isinstance(layer.lora_magnitude_vector[ADAPTER_NAME], InputAxisDora)
    exported = read_adapters(model)[name]
    in_features = bases[name].weight.shape[1]
    assert exported.tensors["dora_scale"].shape[:2] == (1, in_features)
    assert exported.alpha == 4.0  # alpha/dim folded into up: loaders that decompose W + up @ down agree
    x = _inputs(name)
    with torch.no_grad():
        ours = model[name](x)
        base = bases[name]
        assert (ours - base(x)).abs().max() > 0.1
        for delta in (_a1111_delta(base.weight, exported, 1.0), _comfyui_delta(base.weight, exported, 1.0),
                      _lycoris_delta(base, exported)):
            torch.testing.assert_close(_apply(base, x, delta), ours, atol=1e-5, rtol=1e-5)
        # At weight 0.5 both UIs interpolate the weight, as `dist-lora merge` / sample grids do.
        half = merged_weight(layer, 0.5) - base.weight
        torch.testing.assert_close(_a1111_delta(base.weight, exported, 0.5), half, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(_comfyui_delta(base.weight, exported, 0.5), half, atol=1e-6, rtol=1e-5)
        # An fp16 file: the same within fp16 rounding.
        fp16 = ModuleAdapter("lora", {k: v.half().float() for k, v in exported.tensors.items()}, exported.alpha)
        torch.testing.assert_close(_apply(base, x, _a1111_delta(base.weight, fp16, 1.0)), ours, atol=2e-3, rtol=2e-3)


def test_output_axis_files_are_what_the_uis_get_wrong() -> None:
    """The per-row convention (peft's, kept for the diffusers layout): AUTOMATIC1111 and ComfyUI apply such
    a file off by far more than rounding; that is why kohya-format files default to the input axis."""
    model, bases = _trained("output")
    exported = read_adapters(model)["linear"]
    assert exported.tensors["dora_scale"].shape == (10, 1)
    x = _inputs("linear")
    with torch.no_grad():
        ours, base = model["linear"](x), bases["linear"]
        change = (ours - base(x)).abs().max()
        for delta in (_a1111_delta(base.weight, exported, 1.0), _comfyui_delta(base.weight, exported, 1.0)):
            assert (_apply(base, x, delta) - ours).abs().max() > 0.05 * change


def test_the_magnitude_and_both_factors_train() -> None:
    model, _ = _trained("input")
    layer = dict(adapter_layers(model))["conv"]
    model["conv"](_inputs("conv")).square().mean().backward()
    for p in (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight,
              layer.lora_magnitude_vector[ADAPTER_NAME].weight):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_a_fresh_adapter_leaves_the_layer_unchanged() -> None:
    model = nn.ModuleDict(_layers())
    add_network(model, "dora", TargetPlan({"linear": ModuleRank(4, 4.0), "conv": ModuleRank(4, 4.0)}),
                dora_axis="input")
    bases = _layers()
    for name in ("linear", "conv"):
        with torch.no_grad():
            torch.testing.assert_close(model[name](_inputs(name)), bases[name](_inputs(name)), atol=1e-6, rtol=1e-6)


def test_the_axis_follows_the_file_format() -> None:
    from dist_lora.adapters.network import network_metadata, resolve_dora_axis
    from dist_lora.config import NetworkConfig
    from dist_lora.errors import DistLoraError

    dora = NetworkConfig(type="dora")
    assert resolve_dora_axis(dora, "kohya") == "input" and resolve_dora_axis(dora, "diffusers") == "output"
    assert '"wd_on_output": "False"' in network_metadata(dora)["ss_network_args"]
    with pytest.raises(DistLoraError, match=r"dora_axis = 'input' cannot be written in output.format = 'diffusers'"):
        resolve_dora_axis(NetworkConfig(type="dora", dora_axis="input"), "diffusers")
