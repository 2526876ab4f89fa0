"""`dist-lora inspect` and `dist-lora merge` through the command line."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dist_lora.adapters.kohya import ExportInfo, kohya_tensors, save_kohya_lora
from dist_lora.adapters.network import attach_network, network_metadata
from dist_lora.cli import main
from dist_lora.config import NetworkConfig
from dist_lora.models.load import load_components
from tests.integration.test_lycoris_compat import _inputs, _lycoris_apply, _outputs, _randomise


def _file(tiny: Path, out: Path, cfg: NetworkConfig, precision: str = "fp16"):  # type: ignore[no-untyped-def]
    c = load_components(str(tiny))
    attach_network(c.unet, c.text_encoders, c.family, cfg)
    for i, model in enumerate([c.unet, *c.text_encoders]):
        _randomise(model, seed=10 + i)
    info = ExportInfo(c.family, c.prediction_type, "x", cfg.rank, cfg.alpha, 128, {}, network_metadata(cfg))
    save_kohya_lora(out, kohya_tensors(c.unet, c.text_encoders, c.family), info, precision)
    return c


def test_inspect_json(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = NetworkConfig(type="locon", rank=8, alpha=4.0, conv_rank=2, conv_alpha=1.0, up_rank=6, up_alpha=3.0)
    _file(tiny_models["sdxl"], tmp_path / "a.safetensors", cfg)
    assert main(["inspect", str(tmp_path / "a.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "locon" and info["base_model"] == "sdxl_base_v1-0"
    assert info["precision"] == {"float16": sum(2 for _ in range(info["modules"]["unet"]))}
    assert info["blocks"]["down"]["rank"] == 8 and info["blocks"]["up"]["rank"] == 6
    assert "2/1" in info["all"] and "6/3" in info["all"]  # conv layers, up-block override
    assert json.loads(info["metadata"]["ss_network_args"])["algo"] == "locon"
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    assert "type:        locon" in capsys.readouterr().out


def test_merge_two_adapters_into_single_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    _file(tiny_models["sd15"], tmp_path / "a.safetensors", NetworkConfig(type="lora", rank=4, alpha=2.0), "fp32")
    _file(tiny_models["sd15"], tmp_path / "b.safetensors", NetworkConfig(type="loha", rank=2, alpha=1.0), "fp32")
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(tiny_models["sd15"]), "--lora", f"{tmp_path / 'a.safetensors'}:0.8",
            "--lora", f"{tmp_path / 'b.safetensors'}:-0.5", "--out", str(out), "--save-precision", "fp32"]
    assert main(args) == 0
    single = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_models["sd15"]), local_files_only=True)
    base = load_components(str(tiny_models["sd15"]))
    merged = dataclasses.replace(base, unet=single.unet, text_encoders=[single.text_encoder])
    # Expected: LyCORIS' own modules for both files, stacked on the base model at their weights.
    expected = load_components(str(tiny_models["sd15"]))
    _lycoris_apply(expected, tmp_path / "a.safetensors", 0.8)
    _lycoris_apply(expected, tmp_path / "b.safetensors", -0.5)
    inputs = _inputs(base)
    got_hidden, got_unet = _outputs(merged, inputs)
    want_hidden, want_unet = _outputs(expected, inputs)
    assert (got_unet - _outputs(base, inputs)[1]).abs().max() > 1e-2
    torch.testing.assert_close(got_unet, want_unet, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_hidden, want_hidden, atol=2e-5, rtol=1e-4)
    # The same merge written as a diffusers folder holds the same weights.
    folder = tmp_path / "merged_folder"
    assert main([*args[:-4], "--out", str(folder), "--save-precision", "fp32"]) == 0
    from_folder = StableDiffusionPipeline.from_pretrained(str(folder))
    for name, tensor in single.unet.state_dict().items():
        assert torch.equal(from_folder.unet.state_dict()[name], tensor), name


def test_merge_refuses_bad_input(tiny_models: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _file(tiny_models["sdxl"], tmp_path / "xl.safetensors", NetworkConfig(rank=2, alpha=1.0))
    code = main(["merge", "--base", str(tiny_models["sd15"]), "--lora", str(tmp_path / "xl.safetensors"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "trained for sdxl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(["merge", "--base", str(tiny_models["sd15"]), "--lora", f"{tmp_path / 'xl.safetensors'}:abc",
                 "--out", str(tmp_path / "out")])
    assert code == 2
