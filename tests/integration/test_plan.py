"""`dist-lora plan`: model sizes from configs on the meta device, checked against real models."""

import json
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


def test_meta_estimate_matches_a_real_forward(tiny_models: dict[str, Path]) -> None:
    """Saved-for-backward bytes of a real bf16 forward on CPU, counted by storage, against the plan's
    meta-device count (which accounts attention as fused kernels save it, so it may be a little lower)."""
    network = NetworkConfig(rank=4, alpha=4.0)
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
    assert "Fits in" in text and ": no" in text and "training.gradient_checkpointing=true" in text


def test_plan_needs_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "model.pretrained=stabilityai/stable-diffusion-xl-base-1.0",
                 f"data.shards={tmp_path}"]) == 2
    assert "model.config_dir" in capsys.readouterr().err
