"""`dist-lora verify`: each loader's report against the loader itself (diffusers, lycoris-lora) or its rules
restated here (AUTOMATIC1111, ComfyUI, sd-scripts), on files of each layout; `--fix` output against the
file it came from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dist_lora.adapters.diffusers_format import save_diffusers_lora
from dist_lora.adapters.io import apply_adapter_file
from dist_lora.adapters.kohya import module_key_table
from dist_lora.adapters.loaders.diffusers_loader import text_encoders_load_dora_magnitudes
from dist_lora.adapters.loaders.fix import fix_file
from dist_lora.adapters.loaders.names import COMPONENTS, family_names
from dist_lora.adapters.loaders.sd_scripts import is_kohya_target
from dist_lora.adapters.loaders.verify import verify_file
from dist_lora.cli import main
from dist_lora.errors import DistLoraError
from dist_lora.models.load import load_components
from tests.integration.test_lycoris_compat import FAMILY, _adapted, _export, _inputs, _outputs

UIS_READING_KOHYA = ("a1111", "comfyui", "kohya")


def _pipe(folder: Path):  # type: ignore[no-untyped-def]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder))


def _encoders(pipe) -> list[nn.Module]:  # type: ignore[no-untyped-def]
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])


def _peft_modules(pipe) -> set[str]:  # type: ignore[no-untyped-def]
    """What diffusers really adapted: every module it wrapped in a peft layer, labelled as verify labels."""
    labels = set()
    for component, model in enumerate([pipe.unet, *_encoders(pipe)]):
        for path, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                labels.add(f"{COMPONENTS[component]}.{path}")
    return labels


def _as_components(pipe, like):  # type: ignore[no-untyped-def]
    return type(like)(like.family, like.prediction_type, like.tokenizers, _encoders(pipe), pipe.vae, pipe.unet,
                      like.noise_scheduler)


def _report(path: Path, arch: str, tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    result = verify_file(path, family=FAMILY[arch], base=str(tiny_models[arch]))
    return {r.ui: r for r in result.reports}, result


def _file_modules(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return {k.partition(".")[0] for k in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_our_export_in_each_loader(kind: str, arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    ours = _adapted(arch, kind, tiny_models)
    path = _export(ours, kind, tmp_path / "ours.safetensors")
    reports, result = _report(path, arch, tiny_models)
    assert result.parsed.family_source == "given" and not result.mismatched
    table = module_key_table(ours.unet, ours.text_encoders, ours.family)
    expected = {f"{COMPONENTS[table[m][0]]}.{table[m][1]}" for m in _file_modules(path)}
    keys = set(load_file(str(path)))
    for ui in UIS_READING_KOHYA:
        assert reports[ui].ok, (ui, reports[ui].refused, list(reports[ui].ignored.items())[:3])
        assert set(reports[ui].loaded) == keys and reports[ui].modules() == expected, ui
    pipe = _pipe(tiny_models[arch])
    diffusers_report = reports["diffusers"]
    if kind in ("loha", "lokr"):
        # diffusers' SD pipelines convert kohya LoRA tensors only: the report and the loader both refuse.
        assert diffusers_report.refused and not diffusers_report.loaded
        with pytest.raises(ValueError, match="not been correctly renamed"):
            pipe.load_lora_weights(str(path))
        return
    pipe.load_lora_weights(str(path))
    assert diffusers_report.modules() == _peft_modules(pipe) == expected
    dropped = {k for k in keys if k.endswith(".dora_scale")}
    assert set(diffusers_report.ignored) == dropped and bool(dropped) == (kind == "dora")
    assert set(diffusers_report.loaded) == keys - dropped


def _comfyui_takes(key: str) -> bool:
    """ComfyUI's map for diffusers-named keys (comfy/lora.py): ``unet.<module>`` only where the module is
    spelled as in the old attention-processor layout, which renames every ``.to_`` projection; text
    encoder keys only as ``text_encoder.text_model.encoder.layers...``; of peft's tensors, ``lora_A`` and
    ``lora_B`` (its DoRA reads ``dora_scale``, not ``lora_magnitude_vector``)."""
    if key.endswith("lora_magnitude_vector"):
        return False
    if key.startswith("unet."):
        return ".to_" not in key
    return key.startswith(("text_encoder.text_model.", "text_encoder_2.text_model."))


@pytest.mark.parametrize(("arch", "kind"), [("sd15", "locon"), ("sdxl", "lora"), ("sd15", "dora")])
def test_diffusers_layout_and_its_fix(arch: str, kind: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # The diffusers layout keeps peft's DoRA magnitude per output row.
    ours = _adapted(arch, "dora_out" if kind == "dora" else kind, tiny_models)
    source = save_diffusers_lora(tmp_path / "diffusers.safetensors", ours.unet, ours.text_encoders, ours.family,
                                 torch.float32)
    keys = set(load_file(str(source)))
    reports, _ = _report(source, arch, tiny_models)
    assert set(reports["a1111"].ignored) == keys and not reports["a1111"].loaded
    assert set(reports["kohya"].ignored) == keys and not reports["kohya"].loaded
    assert set(reports["comfyui"].loaded) == {k for k in keys if _comfyui_takes(k)}
    assert set(reports["comfyui"].ignored) == {k for k in keys if not _comfyui_takes(k)}
    reference = _pipe(tiny_models[arch])
    reference.load_lora_weights(str(source))
    assert reports["diffusers"].modules() == _peft_modules(reference)
    inputs = _inputs(ours)
    trained_hidden, trained_unet = _outputs(ours, inputs)
    loaded_hidden, loaded_unet = _outputs(_as_components(reference, ours), inputs)
    # Text encoder DoRA magnitudes: what the report says of them is what the real load does.
    magnitudes = {k for k in keys if k.startswith("text_encoder") and k.endswith("lora_magnitude_vector")}
    assert set(reports["diffusers"].ignored) == (magnitudes if not text_encoders_load_dora_magnitudes() else set())
    assert set(reports["diffusers"].loaded) == keys - set(reports["diffusers"].ignored)
    for key in magnitudes:
        path = key.removeprefix("text_encoder.").removesuffix(".lora_magnitude_vector")
        loaded = next(reference.text_encoder.get_submodule(path).lora_magnitude_vector.parameters())
        assert torch.equal(loaded.flatten(), load_file(str(source))[key].flatten()) == \
            text_encoders_load_dora_magnitudes()
    if not magnitudes:  # (the UNet reads the text encoder's output)
        torch.testing.assert_close(loaded_hidden, trained_hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded_unet, trained_unet, atol=1e-5, rtol=1e-5)

    fixed_path = tmp_path / "fixed.safetensors"
    result = fix_file(source, fixed_path, FAMILY[arch], str(tiny_models[arch]))
    assert result.modules == result.renamed == len(reports["diffusers"].modules())
    assert result.alphas_from_peft == result.modules and result.alphas_added == 0
    assert result.dora_reshaped == (result.modules if kind == "dora" else 0)
    fixed_reports, _ = _report(fixed_path, arch, tiny_models)
    fixed = load_file(str(fixed_path))
    for ui in ("a1111", "comfyui", "kohya"):
        assert fixed_reports[ui].ok and set(fixed_reports[ui].loaded) == set(fixed), ui
    if kind == "dora":
        # diffusers drops kohya-layout magnitudes (reported); our reader applies them as peft does.
        assert set(fixed_reports["diffusers"].ignored) == {k for k in fixed if k.endswith(".dora_scale")}
        applied = load_components(str(tiny_models[arch]))
        apply_adapter_file(fixed_path, applied.unet, applied.text_encoders, applied.family)
        hidden, unet_out = _outputs(applied, inputs)
    else:
        assert fixed_reports["diffusers"].ok
        again = _pipe(tiny_models[arch])
        again.load_lora_weights(str(fixed_path))
        assert _peft_modules(again) == _peft_modules(reference)  # every module of the file consumed
        hidden, unet_out = _outputs(_as_components(again, ours), inputs)
    # The fixed file means what was trained.
    torch.testing.assert_close(unet_out, trained_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, trained_hidden, atol=1e-5, rtol=1e-5)
    assert (trained_unet - _outputs(load_components(str(tiny_models[arch])), inputs)[1]).abs().max() > 1e-3


def _lycoris_network(unet: nn.Module, algo: str):  # type: ignore[no-untyped-def]
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, factor=4)
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
            assert "alpha" not in name
    return network


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_lycoris_layout_and_its_fix(algo: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """lycoris-lora's own files (as SimpleTuner writes them): ``lycoris_`` + diffusers module names."""
    arch = "sdxl"
    adapted = load_components(str(tiny_models[arch]))
    network = _lycoris_network(adapted.unet, algo)
    source = tmp_path / "lycoris.safetensors"
    network.save_weights(str(source), torch.float32, {})
    keys = set(load_file(str(source)))
    assert all(k.startswith("lycoris_") for k in keys)
    reports, result = _report(source, arch, tiny_models)
    assert set(result.layouts()) == {"SimpleTuner lycoris_"}
    assert reports["comfyui"].ok and set(reports["comfyui"].loaded) == keys
    for ui in ("a1111", "kohya"):
        assert set(reports[ui].ignored) == keys, ui
    assert reports["diffusers"].refused and "every key must hold 'lora'" in reports["diffusers"].refused

    fixed_path = tmp_path / "fixed.safetensors"
    fix_file(source, fixed_path, FAMILY[arch], str(tiny_models[arch]))
    fixed_reports, _ = _report(fixed_path, arch, tiny_models)
    for ui in UIS_READING_KOHYA:
        assert fixed_reports[ui].ok, (ui, list(fixed_reports[ui].ignored.items())[:3])
    names = family_names(FAMILY[arch], str(tiny_models[arch]))
    inverse = {target: key for key, target in names.kohya.items()}
    source_tensors, fixed = load_file(str(source)), load_file(str(fixed_path))
    rewritten = 0
    for key, tensor in source_tensors.items():  # the same tensors under the kohya (SGM) names
        module, _, part = key.partition(".")
        path = module.removeprefix("lycoris_")
        target = next(t for t in names.modules if t[0] == 0 and t[1].replace(".", "_") == path)
        if f"{inverse[target]}.lokr_w2" in fixed and f"{module}.lokr_w2_a" in source_tensors:
            rewritten += 1  # a convolution's factor lycoris cannot split back, written whole (the output below)
            continue
        assert torch.equal(fixed[f"{inverse[target]}.{part}"], tensor)
    assert (rewritten > 0) == (algo == "lokr")

    inputs = _inputs(adapted)
    lycoris_hidden, lycoris_unet = _outputs(adapted, inputs)
    applied = load_components(str(tiny_models[arch]))
    if algo == "lora":
        assert fixed_reports["diffusers"].ok
        pipe = _pipe(tiny_models[arch])
        pipe.load_lora_weights(str(fixed_path))
        applied = _as_components(pipe, applied)
    else:
        assert fixed_reports["diffusers"].refused  # no SD pipeline of diffusers loads kohya-layout LoKr
        apply_adapter_file(fixed_path, applied.unet, applied.text_encoders, applied.family)
    torch.testing.assert_close(_outputs(applied, inputs)[1], lycoris_unet, atol=1e-5, rtol=1e-5)


def _renamed(tensors: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        new_module, new_part = rename(module, part)
        out[f"{new_module}.{new_part}"] = tensor
    return out


def test_naming_variants_fix_back_to_our_export(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Variants other tools write (SDXL UNet keys in diffusers names, ``lora_te_`` for SDXL's first encoder,
    ``lora_A``/``lora_B``, no alphas) come back as the exact file we export."""
    arch = "sdxl"
    ours = _adapted(arch, "locon", tiny_models)
    original = load_file(str(_export(ours, "locon", tmp_path / "ours.safetensors")))
    table = module_key_table(ours.unet, ours.text_encoders, ours.family)

    def variant(module: str, part: str) -> tuple[str, str]:
        component, path = table[module]
        if component == 0:
            module = "lora_unet_" + path.replace(".", "_")
        elif component == 1:
            module = module.replace("lora_te1_", "lora_te_")
        return module, {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)

    varied = _renamed(original, variant)
    save_file(varied, str(tmp_path / "variant.safetensors"))
    reports, result = _report(tmp_path / "variant.safetensors", arch, tiny_models)
    assert "kohya prefix, diffusers module names" in result.layouts() and "lora_te_ prefix in an SDXL file" in \
        result.layouts()
    kohya_takes = {k for k in varied if k.startswith("lora_te2_") and not k.endswith(("lora_A.weight",
                                                                                        "lora_B.weight"))}
    assert set(reports["kohya"].loaded) == kohya_takes  # SGM names and lora_te1_ only; lora_down/lora_up only
    assert reports["comfyui"].ok  # it maps all of these spellings
    fix_file(tmp_path / "variant.safetensors", tmp_path / "fixed.safetensors", "sdxl", str(tiny_models[arch]))
    fixed = load_file(str(tmp_path / "fixed.safetensors"))
    assert set(fixed) == set(original)
    assert all(torch.equal(fixed[k], original[k]) for k in original)

    # Without alphas every loader applies scale 1: --fix writes that scale as alpha = rank.
    save_file({k: v for k, v in original.items() if not k.endswith(".alpha")}, str(tmp_path / "no_alpha.safetensors"))
    result_fix = fix_file(tmp_path / "no_alpha.safetensors", tmp_path / "alpha.safetensors", "sdxl",
                          str(tiny_models[arch]))
    with_alpha = load_file(str(tmp_path / "alpha.safetensors"))
    assert result_fix.alphas_added == len({k.partition(".")[0] for k in original})
    for key, tensor in with_alpha.items():
        if key.endswith(".alpha"):
            assert tensor.item() == with_alpha[key.replace(".alpha", ".lora_down.weight")].shape[0]


def _full_size_file(family: str, path: Path) -> set[str]:
    """Rank-1 zero LoRA tensors for every module sd-scripts adapts in the published architecture."""
    names = family_names(family)
    tensors = {}
    for key, target in names.kohya.items():
        info = names.modules[target]
        if not is_kohya_target(info):
            continue
        kernel = info.shape[2:]
        tensors[f"{key}.lora_down.weight"] = torch.zeros(1, info.shape[1], *kernel)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(info.shape[0], 1, *([1] * len(kernel)))
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2",
                                                                      "sdxl": "sdxl_base_v1-0"}[family]})
    return set(tensors)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_published_architectures_load_everywhere(family: str, tmp_path: Path) -> None:
    keys = _full_size_file(family, tmp_path / "full.safetensors")
    result = verify_file(tmp_path / "full.safetensors")
    assert result.parsed.family == family and result.parsed.family_source == "metadata"
    for report in result.reports:
        assert report.ok and set(report.loaded) == keys, (report.ui, report.refused,
                                                          list(report.ignored.items())[:3])
    # Without metadata, the cross-attention width of the key projections tells the family.
    save_file(load_file(str(tmp_path / "full.safetensors")), str(tmp_path / "bare.safetensors"))
    assert verify_file(tmp_path / "bare.safetensors", ["kohya"]).parsed.family == family


def test_a1111_conversion_assumes_two_layers_per_block() -> None:
    """A1111's diffusers-name conversion puts SDXL's first upsampler in output block 2 slot 1 (SD 1.x's
    place); SDXL has attention there, so that key of a diffusers-named SDXL file is lost, and only there."""
    from dist_lora.adapters.loaders.a1111 import convert_diffusers_name_to_compvis

    assert convert_diffusers_name_to_compvis("lora_unet_up_blocks_0_upsamplers_0_conv", False) == \
        "diffusion_model_output_blocks_2_1_conv"
    assert convert_diffusers_name_to_compvis("lora_unet_down_blocks_1_resnets_0_conv1", False) == \
        "diffusion_model_input_blocks_4_0_in_layers_2"
    assert convert_diffusers_name_to_compvis("lora_te_text_model_encoder_layers_3_mlp_fc1", True) == \
        "model_transformer_resblocks_3_mlp_c_fc"


def test_cli_exit_codes_json_and_refusals(tiny_models: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ours = _adapted("sd15", "lora", tiny_models)
    good = _export(ours, "lora", tmp_path / "good.safetensors")
    base = ["--base", str(tiny_models["sd15"])]
    assert main(["verify", str(good), *base]) == 0
    assert "loads every key" in capsys.readouterr().out
    peft = save_diffusers_lora(tmp_path / "peft.safetensors", ours.unet, ours.text_encoders, "sd1", torch.float32)
    assert main(["verify", str(peft), "--family", "sd1", *base, "--ui", "a1111,kohya", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["loaders"]) == {"a1111", "kohya"} and not report["ok"]
    assert report["layouts"] == {"diffusers/peft": report["modules"]}
    out = tmp_path / "fixed.safetensors"
    assert main(["verify", str(peft), "--family", "sd1", *base, "--fix", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["verify", str(peft), "--family", "sd1", *base, "--fix", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["verify", str(good), "--ui", "invokeai", *base]) == 2
    assert "--ui 'invokeai'" in capsys.readouterr().err
    # Keys the fix cannot place: refused, nothing written.
    stray = {**load_file(str(good)), "lora_unet_not_a_module.lora_down.weight": torch.zeros(1, 4)}
    save_file(stray, str(tmp_path / "stray.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(DistLoraError, match=re.escape("lora_unet_not_a_module.lora_down.weight")):
        fix_file(tmp_path / "stray.safetensors", tmp_path / "never.safetensors", base=str(tiny_models["sd15"]))
    assert not (tmp_path / "never.safetensors").exists()
    assert main(["verify", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lokr_convolution_lycoris_cannot_split_is_written_whole(tmp_path: Path) -> None:
    """SD 1.5's 1920 -> 640 conv1 as lycoris-lora itself trains it (factor -1, second factor w2_a @ w2_b):
    lycoris-lora cannot rebuild that module from the file; after --fix it can, with the same change."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.lokr import LokrModule

    name = "lora_unet_up_blocks_1_resnets_0_conv1"
    conv = nn.Conv2d(1920, 640, 3, padding=1)
    trained = LokrModule(name, conv, lora_dim=4, alpha=2.0, factor=-1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in trained.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    weights = {f"{name}.{k}": v.contiguous() for k, v in trained.state_dict().items()}
    assert f"{name}.lokr_w2_a" in weights and f"{name}.lokr_w2_b" in weights
    save_file(weights, str(tmp_path / "lokr.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(RuntimeError):
        make_module(*get_module(weights, name), name, conv)

    kohya = next(r for r in verify_file(tmp_path / "lokr.safetensors").reports if r.ui == "kohya")
    assert any("w2_a @ w2_b" in note for note in kohya.notes)
    result = fix_file(tmp_path / "lokr.safetensors", tmp_path / "fixed.safetensors")
    assert result.lokr_rewritten == 1
    fixed = load_file(str(tmp_path / "fixed.safetensors"))
    assert fixed[f"{name}.lokr_w2"].shape == (32, 48, 3, 3)
    rebuilt = make_module(*get_module(fixed, name), name, conv)
    expected = trained.get_weight(conv.weight.shape)
    torch.testing.assert_close(rebuilt.get_weight(conv.weight.shape), expected, atol=1e-6, rtol=1e-5)
    assert not any("w2_a @ w2_b" in n for r in verify_file(tmp_path / "fixed.safetensors").reports for n in r.notes)


def test_older_layouts_fix_back_to_our_export(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """diffusers' attention-processor layout (``unet.<attention>.processor.to_q_lora.down.weight``, no alphas)
    and ComfyUI's ``diffusion_model.<LDM module>`` keys."""
    arch = "sdxl"
    ours = _adapted(arch, "lora", tiny_models)
    original = load_file(str(_export(ours, "lora", tmp_path / "ours.safetensors")))
    table = module_key_table(ours.unet, ours.text_encoders, ours.family)
    names = family_names("sdxl", str(tiny_models[arch]))
    attention = {m for m in {k.partition(".")[0] for k in original}
                 if table[m][0] == 0 and re.search(r"\.attn[12]\.(to_[qkv]|to_out\.0)$", table[m][1])}
    # Scale 1 modules only: the attention-processor layout has no alphas.
    scale_one = {k: v for k, v in original.items() if k.partition(".")[0] in attention}
    for key in list(scale_one):
        if key.endswith(".lora_up.weight"):
            alpha = original[key.replace(".lora_up.weight", ".alpha")].item()
            scale_one[key] = scale_one[key] * (alpha / scale_one[key].shape[1])
        elif key.endswith(".alpha"):
            scale_one[key] = torch.tensor(float(original[key.replace(".alpha", ".lora_down.weight")].shape[0]))

    def processor(module: str, part: str) -> tuple[str, str]:
        attn, _, proj = table[module][1].removesuffix(".0").rpartition(".")  # to_out.0 -> to_out
        return f"unet.{attn}.processor.{proj}_lora", {"lora_down.weight": "down.weight",
                                                       "lora_up.weight": "up.weight"}[part]

    old = _renamed({k: v for k, v in scale_one.items() if not k.endswith(".alpha")}, processor)
    save_file(old, str(tmp_path / "attn_procs.safetensors"))
    reports, result = _report(tmp_path / "attn_procs.safetensors", arch, tiny_models)
    assert set(result.layouts()) == {"diffusers/peft"}
    assert reports["comfyui"].ok and reports["diffusers"].ok and set(reports["diffusers"].loaded) == set(old)
    assert set(reports["a1111"].ignored) == set(reports["kohya"].ignored) == set(old)
    pipe = _pipe(tiny_models[arch])
    pipe.load_lora_weights(str(tmp_path / "attn_procs.safetensors"))
    assert _peft_modules(pipe) == reports["diffusers"].modules()
    fixed_result = fix_file(tmp_path / "attn_procs.safetensors", tmp_path / "fixed.safetensors", "sdxl",
                            str(tiny_models[arch]))
    assert fixed_result.alphas_added == len(attention)
    fixed = load_file(str(tmp_path / "fixed.safetensors"))
    assert set(fixed) == set(scale_one) and all(torch.equal(fixed[k], scale_one[k]) for k in scale_one)

    def comfy_generic(module: str, part: str) -> tuple[str, str]:
        component, path = table[module]
        return (f"diffusion_model.{names.modules[(0, path)].ldm}" if component == 0 else module), part

    save_file(_renamed(original, comfy_generic), str(tmp_path / "generic.safetensors"))
    reports, _ = _report(tmp_path / "generic.safetensors", arch, tiny_models)
    assert reports["comfyui"].ok
    fix_file(tmp_path / "generic.safetensors", tmp_path / "generic_fixed.safetensors", "sdxl", str(tiny_models[arch]))
    fixed = load_file(str(tmp_path / "generic_fixed.safetensors"))
    assert set(fixed) == set(original) and all(torch.equal(fixed[k], original[k]) for k in original)
