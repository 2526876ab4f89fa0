"""`dist-lora extract` recovers a known low-rank change planted in a tiny model: every changed module, its
change (as lycoris-lora reads the file) equal to the planted one to fp32 rounding, nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from dist_lora.cli import main
from dist_lora.models.load import load_components
from dist_lora.models.single_file import save_single_file
from tests.integration.test_lycoris_compat import modules_by_name
from tests.integration.test_resize import _deltas

# kohya key -> the module path in the pipeline it names
PLANTED = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2":
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
    "lora_unet_mid_block_resnets_0_conv1": ("unet", "mid_block.resnets.0.conv1"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
}


def _module(pipe: StableDiffusionPipeline, component: str, path: str) -> torch.nn.Module:
    model = getattr(pipe, component)
    if component == "text_encoder" and hasattr(model, "text_model"):
        model = model.text_model
    return dict(model.named_modules())[path]


@pytest.fixture(scope="module")
def tuned(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tiny SD 1.5 with a rank-2 change planted in four modules (one a 3x3 conv, one in the text
    encoder), as a diffusers folder and as a single file."""
    root = tmp_path_factory.mktemp("tuned")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"])
    g = torch.Generator().manual_seed(5)
    planted = {}
    with torch.no_grad():
        for key, (component, path) in PLANTED.items():
            weight = _module(pipe, component, path).weight
            flat = (weight.shape[0], weight[0].numel())
            delta = (0.3 * torch.randn(flat[0], 2, generator=g)) @ torch.randn(2, flat[1], generator=g)
            weight += delta.reshape(weight.shape)
            planted[key] = delta.reshape(weight.shape).double().numpy()
    pipe.save_pretrained(root / "folder")
    return {"folder": root / "folder", "single": save_single_file(pipe, root / "tuned.safetensors"),
            "planted": planted}


@pytest.fixture(scope="module")
def by_name(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return modules_by_name(load_components(str(tiny_models["sd15"])))


@pytest.mark.parametrize("form", ["folder", "single"])
def test_extract_recovers_the_planted_change(form: str, tuned: dict, tiny_models: dict[str, Path],
                                             by_name: dict[str, torch.nn.Module], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(tiny_models["sd15"]), "--tuned", str(tuned[form]), "--out", str(out),
                 "--rank", "4", "--conv-rank", "4", "--clamp-quantile", "1", "--save-precision", "fp32",
                 "--config-dir", str(tiny_models["sd15"])]) == 0
    got = _deltas(out, by_name)
    planted = tuned["planted"]
    # Only what changed; a single file's round trip may move other weights by fp32 rounding only.
    assert set(planted) <= got.keys()
    for name, delta in got.items():
        want = planted.get(name, np.zeros_like(delta))
        np.testing.assert_allclose(delta, want, atol=1e-5 * max(np.abs(d).max() for d in planted.values()),
                                   err_msg=name)
    if form == "folder":
        assert got.keys() == planted.keys()
    assert "text encoders included" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert all(v.item() == 4 for k, v in load_file(str(out)).items() if k.endswith(".alpha"))


def test_text_encoders_below_min_diff_are_left_out(tuned: dict, tiny_models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    largest = float(np.abs(tuned["planted"]["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]).max())
    out = tmp_path / "unet_only.safetensors"
    assert main(["extract", "--base", str(tiny_models["sd15"]), "--tuned", str(tuned["folder"]), "--out", str(out),
                 "--rank", "2", "--min-diff", str(largest * 1.01)]) == 0
    keys = {k.split(".")[0] for k in load_file(str(out))}
    assert keys and not any(k.startswith("lora_te") for k in keys)
    assert "lora_unet_mid_block_resnets_0_conv1" not in keys  # convolutions only with --conv-rank
    assert "text encoders left out" in capsys.readouterr().out
    # kohya's default clamping at the 0.99 quantile bounds every factor value.
    tensors = load_file(str(out))
    for key in keys:
        values = torch.cat([tensors[f"{key}.lora_up.weight"].float().flatten(),
                            tensors[f"{key}.lora_down.weight"].float().flatten()])
        assert values.abs().max() <= values.abs().quantile(0.995) * 1.01 + 1e-6


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "--rank is a whole number"),
    (["--rank", "2", "--clamp-quantile", "0.2"], "--clamp-quantile 0.2"),
    (["--rank", "2", "--tuned-is-sdxl"], "a LoRA is extracted between models of one architecture"),
    (["--rank", "2", "--tuned-missing"], "does not exist"),
])
def test_bad_inputs_are_refused_before_loading(args: list[str], message: str, tuned: dict,
                                               tiny_models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tuned_path = str(tuned["folder"])
    if "--tuned-is-sdxl" in args:
        tuned_path = str(tiny_models["sdxl"])
    if "--tuned-missing" in args:
        tuned_path = str(tmp_path / "nowhere")
    args = [a for a in args if not a.startswith("--tuned-")]
    out = tmp_path / "o.safetensors"
    assert main(["extract", "--base", str(tiny_models["sd15"]), "--tuned", tuned_path, "--out", str(out),
                 *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()
