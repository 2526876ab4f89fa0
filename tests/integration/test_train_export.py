"""Train in-process, export in kohya format, load the file with diffusers: the same model comes back."""

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from dist_lora.config import config_from_dict
from dist_lora.models.names import kohya_module_key
from dist_lora.models.single_file import unet_to_ldm
from dist_lora.models.text import encode_prompts, tokenize
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
KEY = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_[^.]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _unet_inputs(pipe, family: str) -> dict:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    with torch.no_grad():
        hidden, pooled = encode_prompts(encoders, tokenize(tokenizers, ["dlsks, red circle", "blue square"]), family)
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[160.0, 160, 0, 16, 128, 128]] * 2)}
    return {"sample": latents, "timestep": torch.tensor([50, 600]), "encoder_hidden_states": hidden,
            "added_cond_kwargs": added}


@torch.no_grad()
def _unet_out(unet, inputs: dict) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return unet(**inputs).sample


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_exported_lora_loads_in_diffusers(arch: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                          tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models[arch], shapes_shards, tmp_path / "run",
                            network={"train_text_encoder": True}, optimizer={"lr": 3e-2})
    result = train(config_from_dict(raw))
    trained = result.model
    family = "sdxl" if arch == "sdxl" else "sd1"
    cls = PIPELINES[arch]

    base = cls.from_pretrained(tiny_models[arch])
    inputs = _unet_inputs(base, family)
    base_out = _unet_out(base.unet, inputs)
    ours = _unet_out(trained.unet, inputs)
    assert (ours - base_out).abs().max() > 1e-3, "training did not change the model; the comparison would be vacuous"

    pipe = cls.from_pretrained(tiny_models[arch])
    pipe.load_lora_weights(str(result.adapter_path), adapter_name="ours")
    theirs = _unet_out(pipe.unet, inputs)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)

    # Text encoders: diffusers applies our lora_te* keys to the same effect.
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    ids = tokenize(tokenizers, ["dlsks, green triangle"])
    with torch.no_grad():
        ours_te = encode_prompts(list(trained.text_encoders), ids, family)[0]
        theirs_te = encode_prompts([pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else []),
                                   ids, family)[0]
    torch.testing.assert_close(theirs_te, ours_te, atol=1e-5, rtol=1e-4)

    # At weight 0 the LoRA-loaded pipeline is the base model again.
    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    torch.testing.assert_close(_unet_out(pipe.unet, inputs), base_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_exported_keys_and_metadata(arch: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                    tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models[arch], shapes_shards, tmp_path / "run",
                            output={"save_precision": "fp16", "name": "my_lora"})
    result = train(config_from_dict(raw))
    with safe_open(str(result.adapter_path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys and all(KEY.match(k) for k in keys), [k for k in keys if not KEY.match(k)][:3]
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(tensors[k].item() == 2.0 for k in keys if k.endswith(".alpha"))
    assert not any("text_model" in k for k in keys)  # text encoder not trained in this run

    # Every UNet key names a module of the architecture's LDM/SGM (SDXL) or diffusers (SD 1.x) naming.
    base = PIPELINES[arch].from_pretrained(tiny_models[arch])
    if arch == "sdxl":
        module_names = {name.rsplit(".", 1)[0].removeprefix("model.diffusion_model.")
                        for name in unet_to_ldm(base.unet)}
    else:
        module_names = {name for name, _ in base.unet.named_modules()}
    known = {kohya_module_key("lora_unet", n) for n in module_names}
    unet_modules = {k.split(".", 1)[0] for k in keys}
    assert unet_modules <= known, sorted(unet_modules - known)[:3]
    if arch == "sdxl":
        assert any(m.startswith("lora_unet_input_blocks_") for m in unet_modules)
        assert any(m.startswith("lora_unet_output_blocks_") for m in unet_modules)

    expected_version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
    expected_arch = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[arch]
    assert meta["ss_base_model_version"] == expected_version
    assert meta["modelspec.architecture"] == expected_arch
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_output_name"] == "my_lora" and meta["ss_steps"] == "4"
    assert json.loads(meta["ss_tag_frequency"])["2_dlsks shapes"]["dlsks"] == 24
    assert all(isinstance(v, str) for v in meta.values())
    data = result.adapter_path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    # The resolved config and metrics were written next to the adapter.
    assert (result.run_dir / "config.toml").is_file()
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_format_on_request(arch: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                     tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models[arch], shapes_shards, tmp_path / "run", optimizer={"lr": 3e-2},
                            network={"train_text_encoder": True}, output={"format": "diffusers"})
    result = train(config_from_dict(raw))
    with safe_open(str(result.adapter_path), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    family = "sdxl" if arch == "sdxl" else "sd1"
    pipe = PIPELINES[arch].from_pretrained(tiny_models[arch])
    inputs = _unet_inputs(pipe, family)
    pipe.load_lora_weights(str(result.run_dir), weight_name=result.adapter_path.name)
    # alpha (2) != rank (4): diffusers must take the scale from the metadata we wrote.
    torch.testing.assert_close(_unet_out(pipe.unet, inputs), _unet_out(result.model.unet, inputs),
                               atol=1e-5, rtol=1e-4)
