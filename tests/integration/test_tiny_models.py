from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from dist_lora.cli import main
from dist_lora.models.load import ModelSourceError, inspect_model_source, load_components
from dist_lora.models.single_file import save_single_file

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_pipeline_loads_from_folder_and_single_file(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cls = PIPELINES[arch]
    folder = tiny_models[arch]
    pipe = cls.from_pretrained(folder)
    if arch == "sdxl":
        assert pipe.text_encoder_2.config.projection_dim == pipe.text_encoder_2.config.hidden_size
        assert pipe.unet.config.addition_embed_type == "text_time"
    checkpoint = save_single_file(pipe, tmp_path / f"{arch}.safetensors")
    single = cls.from_single_file(str(checkpoint), config=str(folder), local_files_only=True)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for name in components:
        a, b = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    images = [p("a red circle", num_inference_steps=2, height=128, width=128, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images for p in (pipe, single)]
    assert images[0].shape == (1, 3, 128, 128)
    torch.testing.assert_close(images[0], images[1])
    # Our loader recognises the family from both forms.
    assert inspect_model_source(str(folder)).family == FAMILY[arch]
    assert inspect_model_source(str(checkpoint)).family == FAMILY[arch]
    loaded = load_components(str(checkpoint), config_dir=str(folder))
    assert loaded.family == FAMILY[arch] and len(loaded.text_encoders) == (2 if arch == "sdxl" else 1)


def test_tiny_model_cli(tmp_path: Path) -> None:
    single = str(tmp_path / "m.safetensors")
    assert main(["tiny-model", "--arch", "sd15", str(tmp_path / "m"), "--single-file", single]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file() and (tmp_path / "m.safetensors").is_file()


def test_model_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        inspect_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        inspect_model_source(str(tmp_path))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="pickle"):
        inspect_model_source(str(pickle))
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelSourceError, match="not a readable"):
        inspect_model_source(str(broken))
    assert inspect_model_source("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"
