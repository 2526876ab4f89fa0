"""Sample images during training: the same images diffusers renders from the exported file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from dist_lora.config import config_from_dict
from dist_lora.sampling.samplers import find_sampler
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow
PROMPTS = ["a dlsks red square --n blurry --s 6 --d 11 --l 6 --w 64 --h 64",
           "a dlsks blue circle --ss dpm++_2m_karras --s 5 --w 96 --h 64"]
# Pixel levels (of 255) two renderings of the same model may differ by: float reduction order only.
TOLERANCE = 2


def _raw(model: Path, shards: Path, out: Path, sample: dict | None = None) -> dict:
    return tiny_train_config(model, shards, out, optimizer={"lr": 5e-2}, training={"max_steps": 3, "batch_size": 2},
                             sample={"prompts": PROMPTS, "at_start": True, **(sample or {})})


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _diffusers_image(model: Path, adapter: Path | None, prompt: str, negative: str, steps: int, seed: int, cfg: float,
                     sampler: str, width: int = 64, height: int = 64) -> np.ndarray:
    pipe = DiffusionPipeline.from_pretrained(str(model))
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    pipe.scheduler = find_sampler(sampler).build(pipe.scheduler.config)
    image = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                 width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_training_samples_equal_diffusers_renderings_of_the_file(arch: str, tiny_models: dict[str, Path],
                                                                  shapes_shards: Path, tmp_path: Path) -> None:
    model = tiny_models[arch]
    result = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "run")))
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-00000000", "step-00000003"]
    for step in ("step-00000000", "step-00000003"):
        assert sorted(p.name for p in (samples / step).iterdir()) == [
            "00-a-dlsks-red-square.png", "01-a-dlsks-blue-circle.png", "grid.png"]
    final = samples / "step-00000003"
    # The trained adapter changed the image; the exported file loaded by diffusers renders the same one.
    first = _pixels(final / "00-a-dlsks-red-square.png")
    assert np.abs(first - _pixels(samples / "step-00000000" / "00-a-dlsks-red-square.png")).max() > 10
    want = _diffusers_image(model, result.adapter_path, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(first - want).max() <= TOLERANCE
    second = _pixels(final / "01-a-dlsks-blue-circle.png")
    assert second.shape == (64, 96, 3)
    want = _diffusers_image(model, result.adapter_path, "a dlsks blue circle", "", 5, 2, 7.5, "dpm++_2m_karras",
                            width=96)
    assert np.abs(second - want).max() <= TOLERANCE
    # Before the first step the adapters are zero: the base model's image.
    base = _diffusers_image(model, None, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(_pixels(samples / "step-00000000" / "00-a-dlsks-red-square.png") - base).max() <= TOLERANCE
    # A1111's "parameters" text: prompt with the adapter and its weight, then the settings.
    text = Image.open(final / "00-a-dlsks-red-square.png").text["parameters"]  # type: ignore[attr-defined]
    assert text == ("a dlsks red square <lora:adapter:1>\nNegative prompt: blurry\nSteps: 6, Sampler: Euler a, "
                    "CFG scale: 6, Seed: 11, Size: 64x64")


def test_zero3_samples_equal_diffusers_renderings_of_the_file(tiny_models: dict[str, Path], shapes_shards: Path,
                                                              tmp_path: Path) -> None:
    """ZeRO-3 shards the UNet (here every parameter: by default it keeps a tiny model's whole): both ranks
    render every prompt in step, gathering each layer as it runs, and the main rank writes them."""
    from tests.integration.distributed_helpers import run_training, zero3_everything_partitioned

    model = tiny_models["sd15"]
    raw = _raw(model, shapes_shards, tmp_path / "run", {"at_start": False})
    run_training(raw, tmp_path, launch=str(zero3_everything_partitioned(tmp_path)))
    final = tmp_path / "run" / "samples" / "step-00000003"
    assert sorted(p.name for p in final.iterdir()) == ["00-a-dlsks-red-square.png", "01-a-dlsks-blue-circle.png",
                                                       "grid.png"]
    adapter = tmp_path / "run" / "adapter.safetensors"
    want = _diffusers_image(model, adapter, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(_pixels(final / "00-a-dlsks-red-square.png") - want).max() <= TOLERANCE
    want = _diffusers_image(model, adapter, "a dlsks blue circle", "", 5, 2, 7.5, "dpm++_2m_karras", width=96)
    assert np.abs(_pixels(final / "01-a-dlsks-blue-circle.png") - want).max() <= TOLERANCE
    # The adapter trained: its image is not the base model's.
    base = _diffusers_image(model, None, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(_pixels(final / "00-a-dlsks-red-square.png") - base).max() > 10


def test_samples_from_cached_latents_and_text_load_the_encoders_for_sampling(
        tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    from dist_lora.data.cache import CacheOptions, cache_dataset

    model = tiny_models["sdxl"]
    cache_dataset(shapes_shards, tmp_path / "cached", CacheOptions(model=str(model)))
    result = train(config_from_dict(_raw(model, tmp_path / "cached", tmp_path / "run", sample={"at_start": False})))
    assert result.model is not None and not result.model.text_encoders  # trained without the encoders
    image = _pixels(tmp_path / "run" / "samples" / "step-00000003" / "00-a-dlsks-red-square.png")
    want = _diffusers_image(model, result.adapter_path, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(image - want).max() <= TOLERANCE


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def test_a_failed_round_is_skipped_and_memory_does_not_grow_over_rounds(
        monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import gc

    from dist_lora.train import sample_hook as hook

    real_render, real_write = hook.render, hook.SampleHook._write
    rss: list[float] = []

    def render(pipeline, modules, prompt):  # type: ignore[no-untyped-def]
        if hook_step[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_render(pipeline, modules, prompt)

    def write(self, step, rendered):  # type: ignore[no-untyped-def]
        real_write(self, step, rendered)
        gc.collect()
        rss.append(_rss_mib())

    hook_step = [0]
    real_run = hook.SampleHook.run

    def run(self, ctx):  # type: ignore[no-untyped-def]
        hook_step[0] = ctx.step
        return real_run(self, ctx)

    monkeypatch.setattr(hook, "render", render)
    monkeypatch.setattr(hook.SampleHook, "_write", write)
    monkeypatch.setattr(hook.SampleHook, "run", run)
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run", training={"max_steps": 6},
                            sample={"prompts": ["a dlsks red square --w 64 --h 64 --s 2"], "every_steps": 1})
    result = train(config_from_dict(raw))
    assert result.steps == 6
    rounds = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert rounds == [f"step-{s:08d}" for s in (1, 2, 4, 5, 6)]  # step 3's round failed and was skipped
    assert "sample round at step 3 skipped on every rank" in caplog.text and "render fewer or smaller" in caplog.text
    # Host memory after the 2nd round and after the 5th: no growth from round to round beyond noise.
    print("host memory after each round (MiB):", [round(r, 1) for r in rss])
    assert len(rss) == 5 and rss[-1] - rss[1] < 25, rss


def test_wandb_offline_run_holds_the_sample_images(monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path],
                                                   shapes_shards: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = _raw(tiny_models["sd15"], shapes_shards, tmp_path / "run", sample={"at_start": False})
    raw["logging"].update(wandb_project="dist-lora-test", tensorboard=False)
    train(config_from_dict(raw))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = sorted(p.name for p in runs[0].rglob("media/images/*.png"))
    assert len(images) == 3 and all(name.startswith("samples_3_") for name in images), images
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("kind", ["loha", "oft"])
def test_lycoris_sample_equals_the_lycoris_package_rendering(kind: str, tiny_models: dict[str, Path],
                                                            shapes_shards: Path, tmp_path: Path) -> None:
    """LoHa, OFT: diffusers cannot load them, so the reference applies the file with lycoris-lora's own modules."""
    from types import SimpleNamespace

    from tests.integration.test_lycoris_compat import _lycoris_apply

    model = tiny_models["sd15"]
    raw = _raw(model, shapes_shards, tmp_path / "run", sample={"at_start": False})
    raw["network"].update(type=kind)
    result = train(config_from_dict(raw))
    pipe = DiffusionPipeline.from_pretrained(str(model))
    _, applied = _lycoris_apply(SimpleNamespace(unet=pipe.unet, text_encoders=[pipe.text_encoder], family="sd1"),
                                result.adapter_path, 1.0)
    assert applied > 0
    pipe.scheduler = find_sampler("euler_a").build(pipe.scheduler.config)
    want = np.asarray(pipe(prompt="a dlsks red square", negative_prompt="blurry", num_inference_steps=6,
                           guidance_scale=6.0, width=64, height=64,
                           generator=torch.Generator("cpu").manual_seed(11)).images[0]).astype(int)
    got = _pixels(tmp_path / "run" / "samples" / "step-00000003" / "00-a-dlsks-red-square.png")
    assert np.abs(got - want).max() <= TOLERANCE


def test_samples_of_the_weight_average_equal_renderings_of_its_file(tiny_models: dict[str, Path],
                                                                     shapes_shards: Path, tmp_path: Path) -> None:
    """With ema.sample and ema.export the samples and the file are the average; a plain run's file (the
    trained weights) renders differently, so the comparison has something to tell apart."""
    model = tiny_models["sd15"]
    one = [PROMPTS[0]]
    averaged = _raw(model, shapes_shards, tmp_path / "ema", {"prompts": one, "at_start": False})
    averaged["ema"] = {"decay": 0.9, "export": True, "sample": True}
    result = train(config_from_dict(averaged))
    plain = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "plain", {"prompts": one, "at_start": False})))
    got = _pixels(tmp_path / "ema" / "samples" / "step-00000003" / "00-a-dlsks-red-square.png")
    want = _diffusers_image(model, result.adapter_path, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(got - want).max() <= TOLERANCE
    trained = _diffusers_image(model, plain.adapter_path, "a dlsks red square", "blurry", 6, 11, 6.0, "euler_a")
    assert np.abs(got - trained).max() > 3 * TOLERANCE
