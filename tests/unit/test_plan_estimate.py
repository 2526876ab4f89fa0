"""The memory plan's arithmetic, on made-up model sizes."""

from dataclasses import replace

import pytest

from dist_lora.errors import DistLoraError
from dist_lora.planning.estimate import GIB, RunSettings, estimate, suggestions
from dist_lora.planning.from_config import parse_memory
from dist_lora.planning.shapes import ActivationBytes, ModelSizes

SIZES = ModelSizes(family="sdxl", unet_params=2_000_000_000, text_encoder_params=[100_000_000, 700_000_000],
                   vae_params=80_000_000, unet_adapter_params=40_000_000, text_adapter_params=5_000_000,
                   unet_activations=ActivationBytes(6 * GIB, GIB), text_activations=ActivationBytes(GIB // 2, GIB // 8),
                   vae_encode_peak=GIB + GIB // 2, largest_unet_layer_params=10_000_000, image_size=(1024, 1024))
RUN = RunSettings(batch_size=4, gradient_accumulation_steps=1, mixed_precision="bf16", gradient_checkpointing=False,
                  optimizer="adamw", cached_latents=False, cached_text=False, train_text_encoder=False, vae_fp32=True)


def _component(plan, prefix: str) -> int:  # type: ignore[no-untyped-def]
    return next(c.bytes for c in plan.components if c.name.startswith(prefix))


def test_components_follow_the_settings() -> None:
    plan = estimate(SIZES, RUN)
    assert _component(plan, "UNet weights") == 2_000_000_000 * 2
    assert _component(plan, "adapters") == 40_000_000 * 8  # fp32 weights + fp32 gradients
    assert _component(plan, "optimizer state") == 40_000_000 * 8  # two fp32 moments
    assert _component(plan, "UNet activations") == 4 * 6 * GIB
    assert _component(plan, "VAE encode") == 4 * (GIB + GIB // 2)
    # VAE encode and UNet activations are alive one after the other: the peak takes the larger.
    persistent = sum(c.bytes for c in plan.components if not c.transient)
    assert plan.allocated == persistent + 4 * 6 * GIB
    eight_bit = estimate(SIZES, replace(RUN, optimizer="adamw8bit"))
    assert _component(eight_bit, "optimizer state") == 40_000_000 * 2
    fp32 = estimate(SIZES, replace(RUN, mixed_precision="no"))
    assert _component(fp32, "UNet weights") == 2_000_000_000 * 4


def test_checkpointing_caches_and_zero_shrink_the_plan() -> None:
    base = estimate(SIZES, RUN).allocated
    checkpointed = estimate(SIZES, replace(RUN, gradient_checkpointing=True))
    assert _component(checkpointed, "UNet activations") == 4 * GIB
    cached = estimate(SIZES, replace(RUN, cached_latents=True, cached_text=True))
    assert not any(c.name.startswith(("VAE", "text encoders")) for c in cached.components)
    zero3 = estimate(SIZES, replace(RUN, gpus=4, zero_stage=3))
    assert _component(zero3, "UNet weights") == 2_000_000_000 * 2 // 4 + 10_000_000 * 2
    assert _component(zero3, "optimizer state") == 40_000_000 * 8 // 4
    assert max(checkpointed.allocated, cached.allocated, zero3.allocated) < base


def test_text_encoder_training_counts_their_weights_and_activations() -> None:
    plan = estimate(SIZES, replace(RUN, train_text_encoder=True))
    assert _component(plan, "UNet + text encoder weights") == (2_000_000_000 + 800_000_000) * 2
    assert _component(plan, "adapters") == 45_000_000 * 8
    assert _component(plan, "UNet activations") == 4 * (6 * GIB + GIB // 2)


def test_suggestions_stop_at_the_first_change_that_fits() -> None:
    budget = 24 * GIB
    advice = suggestions(SIZES, RUN, budget)
    assert [a.change for a in advice] == ["training.gradient_checkpointing=true"]
    assert advice[0].device_total <= budget < estimate(SIZES, RUN).device_total
    tight = suggestions(SIZES, RUN, 6 * GIB)
    changes = [a.change for a in tight]
    assert changes[:3] == ["training.gradient_checkpointing=true",
                           "cache latents first (`dist-lora cache`), so the VAE stays unloaded",
                           "optimizer.type=adamw8bit"]
    assert all(a.device_total > 6 * GIB for a in tight[:-1])
    totals = [a.device_total for a in tight]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.parametrize(("text", "expected"), [("24GiB", 24 * GIB), ("80 GB", 80 * GIB), ("16", 16 * GIB),
                                                 ("16384MiB", 16 * GIB), ("7.5g", int(7.5 * GIB))])
def test_memory_sizes_parse(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


def test_bad_memory_size_names_the_option() -> None:
    with pytest.raises(DistLoraError, match="--gpu-memory 'lots'"):
        parse_memory("lots")


def test_offloaded_encoders_are_on_the_gpu_one_phase_at_a_time() -> None:
    text, vae, encode = 800_000_000 * 2, 80_000_000 * 4, 4 * (GIB + GIB // 2)
    online = estimate(SIZES, RUN)
    offloaded = estimate(SIZES, replace(RUN, offload_frozen=True))
    # The UNet's activations (24 GiB) are the largest phase: the encoders' weights leave the peak entirely.
    assert online.allocated - offloaded.allocated == text + vae
    assert _component(offloaded, "VAE weights + encode activations") == vae + encode
    assert all(c.transient for c in offloaded.components if c.name.startswith(("text encoders", "VAE")))
    small_unet = replace(SIZES, unet_activations=ActivationBytes(GIB // 16, GIB // 16))
    plan = estimate(small_unet, replace(RUN, offload_frozen=True))
    persistent = sum(c.bytes for c in plan.components if not c.transient)
    assert plan.allocated == persistent + max(text, vae + encode, 4 * GIB // 16)


def test_text_that_cannot_be_cached_is_offloaded_in_the_suggestions() -> None:
    run = replace(RUN, text_cacheable=False, gradient_checkpointing=True)
    changes = [a.change for a in suggestions(SIZES, run, 4 * GIB)]
    assert changes[:2] == ["cache latents first (`dist-lora cache`), so the VAE stays unloaded",
                           "model.offload_frozen=true (text encoders on the GPU only while they encode)"]
    assert not any("offload" in a.change for a in suggestions(SIZES, replace(RUN, gradient_checkpointing=True),
                                                              4 * GIB))
