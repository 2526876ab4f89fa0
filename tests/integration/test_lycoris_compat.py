"""Every network type, exported, then applied to the base model by the independent `lycoris-lora`
package (and for lora/locon by diffusers), must reproduce our in-memory adapted model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lycoris.modules import get_module, make_module
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dist_lora.adapters.inject import ADAPTER_NAME, adapter_layers, set_multiplier
from dist_lora.adapters.io import AdapterFileError, apply_adapter_file, read_adapter_file
from dist_lora.adapters.kohya import ExportInfo, kohya_tensors, save_kohya_lora
from dist_lora.adapters.merge import bake_adapters
from dist_lora.adapters.network import attach_network, network_metadata
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.load import load_components
from dist_lora.models.names import UNetLayout, unet_diffusers_to_ldm
from dist_lora.models.text import encode_prompts, tokenize

# LoKr factor layouts: plain lokr has both factors full; lokr_w2 decomposes the second; lokr_both both.
# DoRA: "dora" keeps its magnitude per input column (the kohya-format default), dora_out per output row.
TYPES = ["lora", "locon", "loha", "lokr", "lokr_w2", "lokr_both", "dora", "dora_out"]
VARIANTS: dict[str, dict[str, object]] = {
    "lokr_w2": {"type": "lokr", "rank": 2, "lokr_factor": 2},
    "lokr_both": {"type": "lokr", "rank": 1, "lokr_factor": 4, "lokr_decompose_both": True},
    "dora_out": {"type": "dora", "dora_axis": "output"},
}
ARCHS = ["sd15", "sdxl"]
FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}


def _network_config(kind: str) -> NetworkConfig:
    # alpha != rank everywhere, and conv layers get their own rank/alpha.
    fields: dict[str, object] = {"type": kind, "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 3.0,
                                 "train_text_encoder": True, **VARIANTS.get(kind, {})}
    return NetworkConfig(**fields)  # type: ignore[arg-type]


def _randomise(model: nn.Module, seed: int) -> None:
    """Training would move the adapters off their zero-update start; do it directly and reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name, p in layer.named_parameters():
                if ADAPTER_NAME not in name.split(".") or "base_layer" in name:
                    continue
                if "magnitude" in name:  # DoRA magnitudes start at the weight norms; perturb them
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _adapted(arch: str, kind: str, tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    c = load_components(str(tiny_models[arch]))
    attach_network(c.unet, c.text_encoders, c.family, _network_config(kind))
    for i, model in enumerate([c.unet, *c.text_encoders]):
        _randomise(model, seed=i)
    return c


def _export(c, kind: str, path: Path, precision: str = "fp32") -> Path:  # type: ignore[no-untyped-def]
    info = ExportInfo(c.family, c.prediction_type, "t", 4, 2.0, 128, {}, network_metadata(_network_config(kind)))
    return save_kohya_lora(path, kohya_tensors(c.unet, c.text_encoders, c.family), info, precision)


def _inputs(c) -> dict:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(7)
    ids = tokenize(c.tokenizers, ["dlsks, red circle", "a blue square"])
    return {"latents": torch.randn(2, 4, 16, 16, generator=g), "t": torch.tensor([30, 700]), "ids": ids}


@torch.no_grad()
def _outputs(c, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    hidden, pooled = encode_prompts(c.text_encoders, inputs["ids"], c.family)
    added = None
    if c.family == "sdxl":
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    unet_out = c.unet(inputs["latents"], inputs["t"], encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    return hidden, unet_out


class _View(nn.Module):
    """Exposes existing modules under other names (how kohya/LyCORIS walk a model)."""


def _view(named: dict[str, nn.Module]) -> nn.Module:
    root = _View()
    for path, module in named.items():
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, _View())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)
    return root


def _lycoris_module(weights: dict[str, torch.Tensor], lora_name: str, orig: nn.Module) -> nn.Module:
    """LyCORIS' own module for a file's key, built from the file's tensors. lycoris-lora 4.1's make_module
    builds every DoRA module with its magnitude per output row (a per-column dora_scale then fails to
    load); a per-column one is built as LyCORIS' LoConModule with wd_on_out=False."""
    from lycoris.modules.locon import LoConModule

    lyco_type, params = get_module(weights, lora_name)
    scale = weights.get(f"{lora_name}.dora_scale")
    if scale is None or scale.shape[0] != 1:
        return make_module(lyco_type, params, lora_name, orig)
    up, down, _, alpha, dora_scale = params
    module = LoConModule(lora_name, orig, 1, down.size(0), float(alpha), weight_decompose=True, wd_on_out=False)
    with torch.no_grad():
        module.lora_up.weight.copy_(up)
        module.lora_down.weight.copy_(down)
        module.dora_scale.copy_(dora_scale)
    return module


class _LycorisModules:
    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules:
            module.multiplier = multiplier


def modules_by_name(c) -> dict[str, nn.Module]:  # type: ignore[no-untyped-def]
    """Every module of the UNet and text encoders under the name kohya/LyCORIS give it."""
    unet = c.unet
    if c.family == "sdxl":  # kohya's SDXL UNet uses SGM names
        layout = UNetLayout.from_config(unet.config)
        unet = _view({unet_diffusers_to_ldm(n, layout): m for n, m in c.unet.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d))})
    # transformers 5's CLIPTextModel has no text_model level; kohya's names have it.
    encoders = [e if hasattr(e, "text_model") else _view({"text_model": e}) for e in c.text_encoders]
    prefixes = [("lora_unet", unet)] + ([("lora_te1", encoders[0]), ("lora_te2", encoders[1])]
                                        if c.family == "sdxl" else [("lora_te", encoders[0])])
    return {f"{prefix}_{n}".replace(".", "_"): m for prefix, model in prefixes for n, m in model.named_modules()}


def _lycoris_apply(c, path: Path, multiplier: float) -> tuple[_LycorisModules, int]:  # type: ignore[no-untyped-def]
    """Find each file key's module by the name kohya/LyCORIS would give it, build LyCORIS' own module
    for it from the file's tensors (lycoris.modules.get_module/make_module) and patch it in."""
    by_name = modules_by_name(c)
    weights = load_file(str(path))
    applied = []
    for lora_name in sorted({k.split(".")[0] for k in weights}):
        module = _lycoris_module(weights, lora_name, by_name[lora_name])
        module.multiplier = multiplier
        module.apply_to()
        applied.append(module)
    return _LycorisModules(applied), len(applied)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", TYPES)
def test_lycoris_package_reproduces_our_model(kind: str, arch: str, tiny_models: dict[str, Path],
                                              tmp_path: Path) -> None:
    ours = _adapted(arch, kind, tiny_models)
    path = _export(ours, kind, tmp_path / "a.safetensors")
    inputs = _inputs(ours)
    base = load_components(str(tiny_models[arch]))
    base_hidden, base_unet = _outputs(base, inputs)
    our_hidden, our_unet = _outputs(ours, inputs)
    assert (our_unet - base_unet).abs().max() > 1e-2 and (our_hidden - base_hidden).abs().max() > 1e-2

    theirs = load_components(str(tiny_models[arch]))
    network, loaded = _lycoris_apply(theirs, path, 1.0)
    keys = load_file(str(path)).keys()
    modules_in_file = len({k.split(".")[0] for k in keys})
    layout_key = {"lokr": ".lokr_w1", "lokr_w2": ".lokr_w2_a", "lokr_both": ".lokr_w1_a", "dora": ".dora_scale",
                  "dora_out": ".dora_scale"}
    if kind in layout_key:  # the variant really produced the layout it is named after
        assert any(k.endswith(layout_key[kind]) for k in keys)
    assert loaded == modules_in_file  # every key found its module the way kohya/LyCORIS name them
    their_hidden, their_unet = _outputs(theirs, inputs)
    torch.testing.assert_close(their_hidden, our_hidden, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(their_unet, our_unet, atol=2e-5, rtol=1e-4)

    if kind.startswith("dora"):  # the magnitude's axis is the one configured
        scales = [v for k, v in load_file(str(path)).items() if k.endswith(".dora_scale")]
        assert all((v.shape[0] == 1) == (kind == "dora") for v in scales)
    else:  # a DoRA multiplier is not a scale of the update; see test_merge_at_weight
        network.set_multiplier(0.5)
        for model in [ours.unet, *ours.text_encoders]:
            set_multiplier(model, 0.5)
        half_hidden, half_unet = _outputs(ours, inputs)
        their_half_hidden, their_half_unet = _outputs(theirs, inputs)
        torch.testing.assert_close(their_half_unet, half_unet, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(their_half_hidden, half_hidden, atol=2e-5, rtol=1e-4)
        assert (half_unet - our_unet).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_diffusers_loads_lora_and_locon(kind: str, arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    ours = _adapted(arch, kind, tiny_models)
    path = _export(ours, kind, tmp_path / "a.safetensors")
    inputs = _inputs(ours)
    our_hidden, our_unet = _outputs(ours, inputs)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models[arch]))
    pipe.load_lora_weights(str(path))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    theirs = type(ours)(ours.family, ours.prediction_type, ours.tokenizers, encoders, pipe.vae, pipe.unet,
                        ours.noise_scheduler)
    their_hidden, their_unet = _outputs(theirs, inputs)
    torch.testing.assert_close(their_unet, our_unet, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(their_hidden, our_hidden, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", TYPES)
def test_export_import_export_is_identical(kind: str, arch: str, tiny_models: dict[str, Path],
                                           tmp_path: Path) -> None:
    ours = _adapted(arch, kind, tiny_models)
    first = _export(ours, kind, tmp_path / "first.safetensors", precision="fp16")
    fresh = load_components(str(tiny_models[arch]))
    counts = apply_adapter_file(first, fresh.unet, fresh.text_encoders, fresh.family)
    assert counts[0] > 0 and counts[1] > 0
    second = _export(fresh, kind, tmp_path / "second.safetensors", precision="fp16")
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    with safe_open(str(first), framework="pt") as f1, safe_open(str(second), framework="pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    assert {k: v for k, v in m1.items() if k != "modelspec.date"} == {k: v for k, v in m2.items()
                                                                      if k != "modelspec.date"}
    # The imported model computes what the file says (fp16 rounding aside).
    inputs = _inputs(ours)
    torch.testing.assert_close(_outputs(fresh, inputs)[1], _outputs(ours, inputs)[1], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", TYPES)
def test_merge_at_weight(kind: str, arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    ours = _adapted(arch, kind, tiny_models)
    path = _export(ours, kind, tmp_path / "a.safetensors")
    inputs = _inputs(ours)
    merged = load_components(str(tiny_models[arch]))
    apply_adapter_file(path, merged.unet, merged.text_encoders, merged.family)
    for model in [merged.unet, *merged.text_encoders]:
        bake_adapters(model, 0.5)
    assert not list(adapter_layers(merged.unet))
    if kind.startswith("dora"):
        # Expected from LyCORIS' own DoRA weights at full strength, interpolated as the UIs do.
        reference = load_components(str(tiny_models[arch]))
        network, _ = _lycoris_apply(reference, path, 1.0)
        for lora in network.modules:
            base = lora.org_module[0].weight.detach().float()
            dora = lora.get_merged_weight(multiplier=1)[0].float()
            with torch.no_grad():
                lora.restore()
                lora.org_module[0].weight.copy_(base + 0.5 * (dora - base))
        expected = _outputs(reference, inputs)
    else:
        for model in [ours.unet, *ours.text_encoders]:
            set_multiplier(model, 0.5)
        expected = _outputs(ours, inputs)
    got = _outputs(merged, inputs)
    torch.testing.assert_close(got[0], expected[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=5e-5, rtol=1e-4)


def test_import_errors_name_file_and_keys(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    sdxl = _adapted("sdxl", "lora", tiny_models)
    path = _export(sdxl, "lora", tmp_path / "xl.safetensors")
    sd15 = load_components(str(tiny_models["sd15"]))
    with pytest.raises(AdapterFileError, match=r"xl.safetensors.*trained for sdxl"):
        apply_adapter_file(path, sd15.unet, sd15.text_encoders, "sd1")
    # Without metadata the keys themselves give it away.
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file
    save_file(load_file(str(path)), str(bare))
    expected = r"does not fit this sd1 model: \d+ module keys name no module.*lora_te1_"
    with pytest.raises(AdapterFileError, match=expected):
        apply_adapter_file(bare, sd15.unet, sd15.text_encoders, "sd1")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="corrupt.safetensors.*not a readable"):
        read_adapter_file(corrupt)
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_x.weird_tensor": torch.zeros(1), "something_else": torch.zeros(1)}, str(odd))
    with pytest.raises(AdapterFileError, match=r"odd.safetensors.*unknown families.*lora_unet_x.weird_tensor"):
        read_adapter_file(odd)


def test_lokr_factor_that_uis_cannot_load_is_refused(tiny_models: dict[str, Path]) -> None:
    c = load_components(str(tiny_models["sd15"]))
    cfg = NetworkConfig(type="lokr", rank=2, lokr_factor=8)
    with pytest.raises(DistLoraError, match=r"lokr_factor = 8 splits dimension 32 of .* as 8 x 4"):
        attach_network(c.unet, c.text_encoders, c.family, cfg)


@pytest.mark.parametrize("preset", ["attn", "attn_ff", "full"])
def test_network_args_name_a_lycoris_preset(preset: str, tiny_models: dict[str, Path]) -> None:
    """A kohya user continues training from our file by handing its ss_network_args to LyCORIS's
    create_network (what sd-scripts calls): the preset must be one LyCORIS knows, selecting the UNet
    modules our file holds. attn: built by create_network itself; attn_ff: LyCORIS's attn-mlp module
    classes walked here; full: LyCORIS's full preset adapts convolutions too."""
    import json

    from diffusers.models.attention_processor import Attention
    from lycoris.config import PRESET
    from lycoris.kohya import create_network

    cfg = NetworkConfig(type="locon", rank=4, alpha=2.0, preset=preset,  # type: ignore[arg-type]
                        conv_rank=2 if preset == "full" else 0)
    args = json.loads(network_metadata(cfg)["ss_network_args"])
    assert args["preset"] in PRESET
    if preset == "full":
        assert PRESET[args["preset"]]["enable_conv"]
        return
    ours = load_components(str(tiny_models["sd15"]))
    attach_network(ours.unet, ours.text_encoders, ours.family, cfg)
    ours_modules = {key.split(".")[0] for key in kohya_tensors(ours.unet, ours.text_encoders, ours.family)}
    ours_modules = {m for m in ours_modules if m.startswith("lora_unet_")}
    base = load_components(str(tiny_models["sd15"]))
    if preset == "attn":
        # sd-scripts' own UNet calls its attention modules CrossAttention (diffusers: Attention), the class
        # LyCORIS's attn-only preset selects; the modules inside (to_q, to_k, to_v, to_out.0) are the same.
        kohya_attention = type("CrossAttention", (Attention,), {})
        for module in base.unet.modules():
            if type(module) is Attention:
                module.__class__ = kohya_attention
        network = create_network(1.0, cfg.rank, cfg.alpha, base.vae, base.text_encoders[0], base.unet, **args)
        lycoris_modules = {module.lora_name for module in network.unet_loras}
    else:
        targets = set(PRESET[args["preset"]]["unet_target_module"])
        lycoris_modules = {
            f"lora_unet_{outer}.{inner}".replace(".", "_")
            for outer, block in base.unet.named_modules() if type(block).__name__ in targets
            for inner, child in block.named_modules()
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1))}
    # LyCORIS's attn-mlp also lists TimestepEmbedding (for DiT models); in an SD UNet that adds the time
    # embedding's two linears, which neither kohya's LoRA nor ours adapts.
    time_embedding = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"}
    assert ours_modules and lycoris_modules - time_embedding == ours_modules


@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_of_a_full_size_export_rebuilds_in_lycoris(arch: str, tmp_path: Path) -> None:
    """lycoris-lora's create_network_from_weights rebuilds each module from its tensors alone (its factor
    split inferred from their shapes) and refuses the whole file if one does not fit. Here every module of
    an export of the full-size UNet (built on the meta device) goes through the same get_module /
    make_module, with zero tensors of the exported shapes, for every type and LoKr layout."""
    from diffusers import UNet2DConditionModel

    from dist_lora.adapters.kohya import module_key_table
    from dist_lora.models.reference import write_config_folder

    config = json.loads((write_config_folder(arch, tmp_path) / "unet" / "config.json").read_text())
    family = FAMILY[arch]
    for kind in TYPES:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        network = replace(_network_config(kind), preset="full", train_text_encoder=False)
        attach_network(unet, [], family, network)
        exported = kohya_tensors(unet, [], family)
        paths = module_key_table(unet, [], family)
        names = sorted({key.split(".", 1)[0] for key in exported})
        assert len(names) > 200, (kind, len(names))
        seen: set[tuple[object, ...]] = set()
        for name in names:
            base = unet.get_submodule(paths[name][1]).get_base_layer()
            suffixes = sorted(k.split(".", 1)[1] for k in exported if k.startswith(f"{name}."))
            shapes = tuple((s, tuple(exported[f"{name}.{s}"].shape)) for s in suffixes)
            signature = (type(base).__name__, tuple(base.weight.shape), shapes)
            if signature in seen:
                continue  # the rebuild depends on these shapes alone
            seen.add(signature)
            # Real (zero) tensors of the exported shapes: the alpha's value only scales.
            own = {f"{name}.{s}": torch.zeros(shape) for s, shape in shapes}
            # The base layer's shape on the CPU, uninitialised: DoRA reads its weight norm.
            stand_in = (nn.utils.skip_init(nn.Linear, base.in_features, base.out_features, bias=False)
                        if isinstance(base, nn.Linear) else
                        nn.utils.skip_init(nn.Conv2d, base.in_channels, base.out_channels, base.kernel_size,
                                           base.stride, base.padding, bias=False))
            algo, _ = get_module(own, name)
            assert algo is not None, (kind, name, sorted(own))
            try:
                module = _lycoris_module(own, name, stand_in)
            except RuntimeError as exc:
                shapes = {k: tuple(v.shape) for k, v in own.items()}
                raise AssertionError(f"{kind}: lycoris cannot rebuild {name} from {shapes}: {exc}") from exc
            assert module is not None, (kind, name)
            rebuilt = module.state_dict()
            for key, tensor in own.items():
                suffix = key.split(".", 1)[1]
                if suffix in rebuilt and suffix != "alpha":
                    assert tuple(rebuilt[suffix].shape) == tuple(tensor.shape), (kind, name, suffix)
