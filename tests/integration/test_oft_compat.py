"""OFT and BOFT files: applied by lycoris-lora's own modules and with AUTOMATIC1111's and ComfyUI's formulas
(restated below from their loaders), they give the weight change the trained layers make, at multipliers 1
and 0.5; merge, init_from, inspect and verify read them; what cannot take them says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dist_lora.adapters.inject import adapter_layers, set_multiplier
from dist_lora.adapters.inspect import describe_adapter
from dist_lora.adapters.io import AdapterFileError, apply_adapter_file
from dist_lora.adapters.kohya import ExportInfo, kohya_tensors, module_key_table, save_kohya_lora
from dist_lora.adapters.merge import bake_adapters
from dist_lora.adapters.network import attach_network, check_network_options, network_metadata
from dist_lora.adapters.oft_layer import OrthogonalLayer
from dist_lora.adapters.orthogonal import boft_block_size, oft_block_size
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.load import load_components
from tests.integration.test_lycoris_compat import _inputs, _lycoris_apply, _outputs, modules_by_name

ARCHS = ["sd15", "sdxl"]
FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}
# (kind, constraint): with a constraint every module's rotation is bounded (here: all of them reach it).
CASES = [("oft", 0.0), ("oft", 0.01), ("boft", 0.0), ("boft", 0.01)]


def _config(kind: str, constraint: float) -> NetworkConfig:
    # BOFT needs a power-of-two number of even blocks: the tiny SDXL's 48-wide text encoder takes 6.
    return NetworkConfig(type=kind, rank=6 if kind == "boft" else 4, conv_rank=2, preset="full",  # type: ignore[arg-type]
                         train_text_encoder=True, oft_constraint=constraint)


def _adapted(arch: str, kind: str, constraint: float, tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    c = load_components(str(tiny_models[arch]))
    attach_network(c.unet, c.text_encoders, c.family, _config(kind, constraint))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in [c.unet, *c.text_encoders]:
            for _, layer in adapter_layers(model):
                blocks = layer.oft_blocks["default"]
                blocks.copy_(0.2 * torch.randn(blocks.shape, generator=g))
    return c


def _export(c, kind: str, constraint: float, path: Path, precision: str = "fp32") -> Path:  # type: ignore[no-untyped-def]
    info = ExportInfo(c.family, c.prediction_type, "t", 4, 1.0, 128, {}, network_metadata(_config(kind, constraint)))
    return save_kohya_lora(path, kohya_tensors(c.unet, c.text_encoders, c.family), info, precision)


def _rotation(blocks: torch.Tensor, bound: float, comfy: bool) -> torch.Tensor:
    """Cayley with the norm bound: ComfyUI and LyCORIS scale Q when ||Q|| + 1e-8 exceeds the bound (only if
    it is > 0); AUTOMATIC1111 always multiplies by (min(||Q||, bound) + 1e-8) / (||Q|| + 1e-8)."""
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(blocks.shape[-1])
    if comfy:
        norm = torch.norm(q) + 1e-8
        if bound > 0 and norm > bound:
            q = q * bound / norm
    else:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=bound) + 1e-8) / (norm + 1e-8))
    return (eye + q) @ (eye - q).float().inverse()


def a1111_oft_weight(weight: torch.Tensor, blocks: torch.Tensor, alpha: float, multiplier: float) -> torch.Tensor:
    """network_oft.py (kohya branch): constraint alpha * out_dim; updown = rotated - W, times the multiplier."""
    r = _rotation(blocks, alpha * weight.shape[0], comfy=False)
    grouped = weight.reshape(blocks.shape[0], blocks.shape[1], *weight.shape[1:])
    merged = torch.einsum("k n m, k n ... -> k m ...", r, grouped).reshape(weight.shape)
    return weight + (merged - weight) * multiplier


def comfy_weight(weight: torch.Tensor, blocks: torch.Tensor, alpha: float, strength: float) -> torch.Tensor:
    """weight_adapter/oft.py and boft.py: constraint alpha; the strength is applied inside and again outside."""
    r = _rotation(blocks, alpha, comfy=True)
    if blocks.dim() == 3:
        eye = torch.eye(blocks.shape[-1])
        diff = torch.einsum("k n m, k n ... -> k m ...", r * strength - strength * eye,
                            weight.view(blocks.shape[0], blocks.shape[1], *weight.shape[1:])).reshape(weight.shape)
        return weight + strength * diff
    b = blocks.shape[-1]
    inp = weight
    for i in range(blocks.shape[0]):
        bi = r[i]
        k = 2 ** i * (b // 2)
        if strength != 1:
            bi = bi * strength + (1 - strength) * torch.eye(b)
        inp = inp.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        inp = torch.einsum("b i j, b j ...-> b i ...", bi, inp)
        inp = inp.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return weight + strength * (inp - weight)


def _layers_by_key(c) -> dict[str, OrthogonalLayer]:  # type: ignore[no-untyped-def]
    table = module_key_table(c.unet, list(c.text_encoders), c.family)
    models = [c.unet, *c.text_encoders]
    layers = {(i, path): layer for i, m in enumerate(models) for path, layer in adapter_layers(m)}
    return {key: layers[spot] for key, spot in table.items() if spot in layers}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kind", "constraint"), CASES)
def test_loaders_apply_the_file_as_trained(kind: str, constraint: float, arch: str, tiny_models: dict[str, Path],
                                           tmp_path: Path) -> None:
    ours = _adapted(arch, kind, constraint, tiny_models)
    layers = _layers_by_key(ours)
    if constraint:  # the bound really was reached, so the file's blocks carry the scaled rotation
        assert all(not torch.equal(layer.effective_blocks("default"), layer.oft_blocks["default"])
                   for layer in layers.values())
    path = _export(ours, kind, constraint, tmp_path / "a.safetensors")
    file = load_file(str(path))
    assert len({file[k].item() for k in file if k.endswith(".alpha")}) == 1  # one bound for the file
    inputs = _inputs(ours)
    base_out = _outputs(load_components(str(tiny_models[arch])), inputs)
    our_out = _outputs(ours, inputs)
    assert (our_out[1] - base_out[1]).abs().max() > 1e-2 and (our_out[0] - base_out[0]).abs().max() > 1e-2

    # lycoris-lora builds its own diag-oft / boft module of every key and reproduces the model at 1 and 0.5.
    theirs = load_components(str(tiny_models[arch]))
    network, loaded = _lycoris_apply(theirs, path, 1.0)
    assert loaded == len(layers) == len({k.split(".")[0] for k in file})
    for multiplier in (1.0, 0.5):
        network.set_multiplier(multiplier)
        for model in [ours.unet, *ours.text_encoders]:
            set_multiplier(model, multiplier)
        got, want = _outputs(theirs, inputs), _outputs(ours, inputs)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)

    # The UIs' formulas on every module's base weight: ComfyUI applies its strength twice (OFT: s^2 of the
    # change; BOFT: s times the change at s), AUTOMATIC1111 reads no BOFT.
    for key, layer in layers.items():
        blocks, alpha = file[f"{key}.oft_blocks"].float(), float(file[f"{key}.alpha"])
        weight = layer.get_base_layer().weight.detach().float()
        for strength in (1.0, 0.5):
            if kind == "oft":
                torch.testing.assert_close(a1111_oft_weight(weight, blocks, alpha, strength),
                                           layer.merged_weight(strength, "default"), atol=2e-6, rtol=1e-5)
                want_comfy = layer.merged_weight(strength ** 2, "default")
            else:
                want_comfy = weight + strength * (layer.merged_weight(strength, "default") - weight)
            torch.testing.assert_close(comfy_weight(weight, blocks, alpha, strength), want_comfy, atol=2e-6,
                                       rtol=1e-5)

    # Baked at 0.5 (dist-lora merge), the model is the live one at 0.5.
    merged = load_components(str(tiny_models[arch]))
    apply_adapter_file(path, merged.unet, merged.text_encoders, merged.family)
    for model in [merged.unet, *merged.text_encoders]:
        bake_adapters(model, 0.5)
    assert not list(adapter_layers(merged.unet))
    got = _outputs(merged, inputs)
    torch.testing.assert_close(got[0], want[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_export_import_export_is_identical_and_inspect_names_it(kind: str, tiny_models: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    ours = _adapted("sdxl", kind, 0.01, tiny_models)
    first = _export(ours, kind, 0.01, tmp_path / "first.safetensors", precision="fp16")
    fresh = load_components(str(tiny_models["sdxl"]))
    counts = apply_adapter_file(first, fresh.unet, fresh.text_encoders, fresh.family)
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0
    second = _export(fresh, kind, 0.01, tmp_path / "second.safetensors", precision="fp16")
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    inputs = _inputs(ours)
    torch.testing.assert_close(_outputs(fresh, inputs)[1], _outputs(ours, inputs)[1], atol=5e-3, rtol=5e-3)
    info = describe_adapter(first)
    assert info["type"] == kind and set(info["modules"]) == {"unet", "te1", "te2"}
    args = json.loads(info["metadata"]["ss_network_args"])
    assert args["algo"] == {"oft": "diag-oft"}.get(kind, kind) and float(args["constraint"]) == 0.01


def test_block_sizes_are_the_ones_lycoris_rebuilds() -> None:
    from lycoris.functional.general import factorization, power2factorization

    for dim in (32, 48, 64, 320, 640, 768, 1024, 1280, 2048, 2560, 5120, 10240):
        for limit in (1, 2, 4, 6, 8, 10, 16, 32, 64):
            assert oft_block_size(dim, limit) == factorization(dim, limit)[0], (dim, limit)
            size, count = power2factorization(dim, limit)
            assert boft_block_size(dim, limit) == (size if count else None), (dim, limit)


def test_bad_oft_input_is_refused_naming_it(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    c = load_components(str(tiny_models["sdxl"]))
    with pytest.raises(DistLoraError, match=r"cannot split the 48 output channels of 'text_model.encoder.layers.0"
                                            r".*smallest block that fits is 6"):
        attach_network(c.unet, c.text_encoders, c.family, NetworkConfig(type="boft", rank=4, train_text_encoder=True))
    assert not list(adapter_layers(c.text_encoders[0]))  # nothing was half-wrapped
    with pytest.raises(DistLoraError, match="output.format = 'diffusers'"):
        check_network_options(NetworkConfig(type="oft"), "diffusers")
    with pytest.raises(DistLoraError, match="scale_weight_norms"):
        check_network_options(NetworkConfig(type="boft"), "kohya", scale_weight_norms=1.0)

    ours = _adapted("sd15", "oft", 0.0, tiny_models)
    path = _export(ours, "oft", 0.0, tmp_path / "oft.safetensors")
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".oft_blocks"))
    tensors[key] = tensors[key][:-1]  # one block short of the module's channels
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    fresh = load_components(str(tiny_models["sd15"]))
    with pytest.raises(AdapterFileError, match=rf"broken.safetensors.*{key.split('.')[0]}.*do not cover"):
        apply_adapter_file(broken, fresh.unet, fresh.text_encoders, fresh.family)

    from dist_lora.adapters.merge_lora import MergeInput, MergeOptions, merge_lora_files
    from dist_lora.adapters.resize import ResizeRule, resize_file

    with pytest.raises(DistLoraError, match=r"oft.safetensors' is OFT .* cannot be resized"):
        resize_file(path, tmp_path / "r.safetensors", ResizeRule(rank=2, conv_rank=2))
    with pytest.raises(DistLoraError, match=r"is OFT .* cannot be merged into a LoRA"):
        merge_lora_files([MergeInput(str(path), 1.0), MergeInput(str(path), 1.0)], tmp_path / "m.safetensors",
                         MergeOptions(mode="concat"))


def test_modules_by_name_cover_the_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The keys are LyCORIS' (lora_unet_/lora_te_ + module), which AUTOMATIC1111 and ComfyUI map."""
    ours = _adapted("sd15", "oft", 0.0, tiny_models)
    keys = {k.split(".")[0] for k in load_file(str(_export(ours, "oft", 0.0, tmp_path / "a.safetensors")))}
    by_name = modules_by_name(ours)
    assert keys <= by_name.keys() and all(isinstance(by_name[k], nn.Module) for k in keys)


def test_init_from_an_oft_file_continues_under_the_recipes_bound(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """network.init_from: the file's rotations exactly, bounded from then on by network.oft_constraint (the
    file's alpha is a bound its blocks never reach); without one, by the file's alpha as LyCORIS reads it."""
    ours = _adapted("sd15", "oft", 0.01, tiny_models)
    path = _export(ours, "oft", 0.01, tmp_path / "a.safetensors")
    inputs = _inputs(ours)
    for constraint in (0.01, 0.0):
        fresh = load_components(str(tiny_models["sd15"]))
        attached = attach_network(fresh.unet, fresh.text_encoders, fresh.family,
                                  NetworkConfig(type="lora", init_from=str(path), oft_constraint=constraint))
        assert attached.unet_modules > 0 and attached.text_encoder_modules > 0
        layers = _layers_by_key(fresh)
        file = load_file(str(path))
        for key, layer in layers.items():
            dim = layer.get_base_layer().weight.shape[0]
            bound = (constraint or float(file[f"{key}.alpha"])) * dim
            assert layer.constraint["default"] == pytest.approx(bound)
            norm = torch.linalg.vector_norm(file[f"{key}.oft_blocks"] - file[f"{key}.oft_blocks"].transpose(-1, -2))
            assert norm <= bound * (1 + 1e-5)  # the rotation as trained: at, not over, the bound
        got, want = _outputs(fresh, inputs), _outputs(ours, inputs)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_verify_reports_what_each_loader_takes(kind: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """ComfyUI and sd-scripts (lycoris.kohya) take every key; AUTOMATIC1111 v1.10 OFT but no BOFT (its module
    reads [blocks, b, b]); diffusers' load_lora_weights, run on the file, refuses it."""
    from dist_lora.adapters.loaders.verify import format_verification, verify_file

    ours = _adapted("sd15", kind, 0.0, tiny_models)
    path = _export(ours, kind, 0.0, tmp_path / f"{kind}.safetensors")
    result = verify_file(path, base=str(tiny_models["sd15"]))
    reports = {r.ui: r for r in result.reports}
    keys = set(load_file(str(path)))
    assert set(reports["comfyui"].loaded) == keys and set(reports["kohya"].loaded) == keys
    assert reports["diffusers"].refused and not reports["diffusers"].loaded
    if kind == "oft":
        assert set(reports["a1111"].loaded) == keys
    else:
        assert set(reports["a1111"].ignored) == keys
        assert all("BOFT blocks [stages, blocks, b, b]" in why for why in reports["a1111"].ignored.values())
    text = format_verification(result)
    assert "modules are OFT/BOFT" in text and "--fix OUT" not in text
