"""The objective's pure functions against diffusers' scheduler implementation (an independent computation)."""

import torch
from diffusers import DDPMScheduler

from dist_lora.train.diffusion import (
    add_noise,
    diffusion_loss,
    min_snr_weights,
    sample_generators,
    sdxl_time_ids,
    snr,
    training_target,
)
from dist_lora.train.noise import NoiseOptions, draw_noise, draw_timesteps


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_add_noise_matches_diffusers() -> None:
    s = _scheduler()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(x, eps, t, s.alphas_cumprod), s.add_noise(x, eps, t))


def test_v_target_matches_diffusers_velocity() -> None:
    s = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 800])
    torch.testing.assert_close(training_target(x, eps, t, s.alphas_cumprod, "v_prediction"), s.get_velocity(x, eps, t))
    assert torch.equal(training_target(x, eps, t, s.alphas_cumprod, "epsilon"), eps)


def test_min_snr_weights() -> None:
    s = _scheduler()
    t = torch.tensor([5, 200, 900])
    a = s.alphas_cumprod[t]
    expected_snr = a / (1 - a)
    torch.testing.assert_close(snr(s.alphas_cumprod, t), expected_snr)
    w = min_snr_weights(s.alphas_cumprod, t, 5.0, "epsilon")
    torch.testing.assert_close(w, torch.clamp(expected_snr, max=5.0) / expected_snr)
    assert w[0] < 1 and w[2] == 1  # high-SNR (small t) steps are down-weighted


def test_weighted_loss() -> None:
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    assert diffusion_loss(pred, target).item() == 1.0
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 0.5


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_split() -> None:
    whole = sample_generators(7, 3, [0, 1, 2, 3])
    halves = sample_generators(7, 3, [0, 1]) + sample_generators(7, 3, [2, 3])
    assert torch.equal(draw_timesteps(whole, NoiseOptions()), draw_timesteps(halves, NoiseOptions()))
    shape = torch.zeros(4, 4, 2, 2)
    assert torch.equal(draw_noise(shape, whole, NoiseOptions())[0], draw_noise(shape, halves, NoiseOptions())[0])
    other_step = draw_noise(shape, sample_generators(7, 4, [0, 1, 2, 3]), NoiseOptions())[0]
    assert not torch.equal(draw_noise(shape, sample_generators(7, 3, [0, 1, 2, 3]), NoiseOptions())[0], other_step)


def test_sdxl_time_ids_order() -> None:
    assert sdxl_time_ids((768, 1024), (0, 128), (1024, 1024)) == [768, 1024, 0, 128, 1024, 1024]
