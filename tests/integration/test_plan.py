"""`dist-lora plan`: model sizes from configs on the meta device, checked against real models."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dist_lora.adapters.network import attach_network
from dist_lora.cli import main
from dist_lora.config import NetworkConfig
from dist_lora.models.load import load_components
from dist_lora.models.reference import PUBLISHED_PARAMS, write_config_folder
from dist_lora.planning.shapes import measure_model


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_configs_have_the_published_parameter_counts(arch: str, tmp_path: Path) -> None:
    sizes = measure_model(write_config_folder(arch, tmp_path / arch), NetworkConfig(), (256, 256), torch.bfloat16)
    published = PUBLISHED_PARAMS[arch]
    assert sizes.unet_params == published["unet"]
    assert sizes.vae_params == published["vae"]
    encoders = [published["text_encoder"]] + ([published["text_encoder_2"]] if arch == "sdxl" else [])
    assert sizes.text_encoder_params == encoders


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_fp8_plan_counts_the_bytes_the_converted_unet_holds(arch: str, tmp_path: Path) -> None:
    """The full-size UNet built on the meta device and converted as training converts it: the bytes its
    parameters then hold are what the plan counts, about half of bf16."""
    from diffusers import UNet2DConditionModel

    from dist_lora.models.fp8_base import store_in_fp8
    from dist_lora.planning.estimate import RunSettings, estimate

    folder = write_config_folder(arch, tmp_path / arch)
    sizes = measure_model(folder, NetworkConfig(), (256, 256), torch.bfloat16)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    unet.to(torch.bfloat16).requires_grad_(False)
    bf16_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    store_in_fp8(unet, torch.bfloat16)
    fp8_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    run = RunSettings(batch_size=1, gradient_accumulation_steps=1, mixed_precision="bf16", gradient_checkpointing=True,
                      optimizer="adamw8bit", cached_latents=True, cached_text=True, train_text_encoder=False,
                      vae_fp32=True)
    planned = {c.name: c.bytes for c in estimate(sizes, replace(run, base_dtype="fp8")).components}
    assert planned["UNet weights (frozen, fp8)"] == fp8_bytes
    assert {c.name: c.bytes for c in estimate(sizes, run).components}["UNet weights (frozen)"] == bf16_bytes
    assert 0.5 <= fp8_bytes / bf16_bytes < 0.501


@pytest.mark.parametrize("kind", ["lora", "oft", "boft"])
def test_meta_estimate_matches_a_real_forward(kind: str, tiny_models: dict[str, Path]) -> None:
    """Saved-for-backward bytes of a real bf16 forward on CPU, counted by storage, against the plan's
    meta-device count (which accounts attention as fused kernels save it, so it may be a little lower).
    OFT/BOFT save their rotated outputs: the plan runs the same layers on the meta device."""
    network = NetworkConfig(type=kind, rank=4, alpha=4.0)  # type: ignore[arg-type]
    planned = measure_model(tiny_models["sd15"], network, (128, 128), torch.bfloat16)
    unet = load_components(str(tiny_models["sd15"])).unet.to(torch.bfloat16).requires_grad_(False)
    attach_network(unet, [], "sd1", network)
    unet.to(torch.bfloat16)
    assert planned.unet_adapter_params == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    latents = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(latents, torch.tensor([10]), encoder_hidden_states=text)
    real = sum(storages.values())
    assert 0.85 * real <= planned.unet_activations.plain <= 1.02 * real, (planned.unet_activations.plain, real)
    assert planned.unet_activations.checkpointed < 0.5 * planned.unet_activations.plain


def test_plan_command_reports_and_advises(tiny_models: dict[str, Path], shapes_shards: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"model.pretrained={tiny_models['sdxl']}", f"data.shards={shapes_shards}", "training.batch_size=4"]
    assert main(["plan", "--gpu-memory", "100GiB", "--json", *args]) == 0
    roomy = json.loads(capsys.readouterr().out)
    assert roomy["fits"] is True and roomy["suggestions"] == []
    assert sum(v for k, v in roomy["components"].items()) >= roomy["allocated"]
    budget_mib = roomy["device_total"] // 2**20 - 1
    assert main(["plan", "--gpu-memory", f"{budget_mib}MiB", *args]) == 0
    text = capsys.readouterr().out
    # The cheapest change first: the frozen UNet in fp8.
    assert "Fits in" in text and ": no" in text and "model.base_dtype=fp8" in text
    assert main(["plan", "--gpu-memory", f"{budget_mib}MiB", *args, "model.base_dtype=fp8"]) == 0
    text = capsys.readouterr().out
    assert "fp8 base" in text and "training.gradient_checkpointing=true" not in text.split("Fits in")[0]


def test_plan_needs_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "model.pretrained=stabilityai/stable-diffusion-xl-base-1.0",
                 f"data.shards={tmp_path}"]) == 2
    assert "model.config_dir" in capsys.readouterr().err


def test_sdxl_recipe_on_an_fp8_base_plans_within_6_gib(tiny_models: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """configs/sdxl.toml at batch 1 with checkpointing, an 8-bit optimizer and cached 1024^2 latents: on an fp8
    base the full-size SDXL plan fits 6 GiB; in bf16 it does not, and fp8 is the first change advised."""
    from PIL import Image

    (tmp_path / "src" / "1_cube").mkdir(parents=True)
    Image.new("RGB", (1024, 1024), (200, 40, 40)).save(tmp_path / "src" / "1_cube" / "a.png")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "shards"), "--resolution", "1024"]) == 0
    assert main(["cache", str(tmp_path / "shards"), str(tmp_path / "cached"), "--model",
                 str(tiny_models["sdxl"])]) == 0
    capsys.readouterr()
    args = ["--config", str(Path(__file__).parents[2] / "configs" / "sdxl.toml"), "--gpu-memory", "6GiB", "--json",
            f"model.config_dir={write_config_folder('sdxl', tmp_path / 'sdxl')}", f"data.shards={tmp_path / 'cached'}",
            "training.batch_size=1", "training.gradient_checkpointing=true", "optimizer.type=adamw8bit"]
    assert main(["plan", *args, "model.base_dtype=fp8"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["fits"] is True and fp8["device_total"] <= 6 * 2**30
    assert main(["plan", *args]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["fits"] is False and bf16["suggestions"][0]["change"].startswith("model.base_dtype=fp8")
    assert bf16["suggestions"][0]["device_total"] == fp8["device_total"]


@pytest.mark.parametrize("base_dtype", ["nf4", "int8"])
def test_quantised_plan_counts_the_bytes_the_quantised_unet_holds(base_dtype: str,
                                                                  tiny_models: dict[str, Path]) -> None:
    """The tiny SD 1.5 UNet quantised as training quantises it: its parameters' bytes (packed weights, and for
    nf4 the absmax of each block of 64 as bitsandbytes stores it) against the plan's frozen-UNet row."""
    from dist_lora.models.quantized_base import quantize_linears, quantized_layers
    from dist_lora.planning.estimate import RunSettings, estimate

    sizes = measure_model(tiny_models["sd15"], NetworkConfig(), (128, 128), torch.bfloat16)
    unet = load_components(str(tiny_models["sd15"]), load_vae=False, load_text=False).unet
    unet.to(torch.bfloat16).requires_grad_(False)
    quantize_linears(unet, base_dtype, torch.bfloat16, torch.device("cpu"))
    held = sum(p.numel() * p.element_size() for p in unet.parameters())
    if base_dtype == "nf4":  # each block's absmax, and the fp32 absmax of those when they are quantised too
        for layer in quantized_layers(unet):
            state = layer.weight.quant_state
            held += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    run = RunSettings(batch_size=1, gradient_accumulation_steps=1, mixed_precision="bf16", gradient_checkpointing=True,
                      optimizer="adamw8bit", cached_latents=True, cached_text=True, train_text_encoder=False,
                      vae_fp32=True, base_dtype=base_dtype)
    planned = estimate(sizes, run).components[0]
    assert planned.name == f"UNet weights (frozen, {base_dtype} linears)"
    assert abs(planned.bytes - held) <= 0.01 * held, (planned.bytes, held)
