"""kohya's loss, noise and timestep options against formulas computed here independently (float64 numpy
from the definitions in sd-scripts' train_util / custom_train_functions, or draws replayed by hand)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dist_lora.config import TrainingConfig
from dist_lora.train.diffusion import sample_generators
from dist_lora.train.losses import LossOptions, elementwise_loss, huber_parameter, snr_weights
from dist_lora.train.noise import NoiseOptions, draw_noise, draw_timesteps
from dist_lora.train.objective import ObjectiveError, check_objective, training_scheduler


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _alphas() -> np.ndarray:
    return _scheduler().alphas_cumprod.double().numpy()


T = torch.tensor([0, 1, 37, 250, 500, 999])


def test_l2_l1_huber_and_smooth_l1_elements() -> None:
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(6, 4, 3, 3, generator=g) * 3, torch.randn(6, 4, 3, 3, generator=g)
    d = prediction.double().numpy() - target.double().numpy()
    c = np.array([0.05, 0.1, 0.5, 1.0, 2.0, 0.3])
    c4 = c.reshape(-1, 1, 1, 1)
    expected = {"l2": d**2, "l1": np.abs(d),
                "huber": 2 * c4 * (np.sqrt(d**2 + c4**2) - c4),
                "smooth_l1": 2 * (np.sqrt(d**2 + c4**2) - c4)}
    for loss_type, want in expected.items():
        got = elementwise_loss(prediction, target, LossOptions(loss_type=loss_type), torch.tensor(c))
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=loss_type)
    # Pseudo-Huber: quadratic for small errors, 2c|d| for large ones.
    small, large = torch.full((1, 1), 0.05), torch.full((1, 1), 1e3)
    huber = LossOptions(loss_type="huber")
    c = torch.tensor([0.5])
    assert elementwise_loss(small, torch.zeros(1, 1), huber, c).item() == pytest.approx(0.05**2, rel=5e-3)
    assert elementwise_loss(large, torch.zeros(1, 1), huber, c).item() == pytest.approx(1e3, rel=1e-3)
    with pytest.raises(ValueError, match="Huber parameter"):
        elementwise_loss(small, small, huber)


def test_huber_schedules() -> None:
    a = _alphas()[T.numpy()]
    sigma = np.sqrt((1 - a) / a)
    t = T.double().numpy()
    cases = {("constant", 0.1, 2.0): np.full(len(T), 0.2),
             ("exponential", 0.1, 2.0): 2.0 * 0.1 ** (t / 1000),  # exp(-(-ln c / T) t) = c^(t/T)
             ("snr", 0.1, 2.0): (1 - 0.1) / (1 + sigma) ** 2 + 0.1}  # huber_scale is not used by 'snr'
    for (schedule, c, scale), want in cases.items():
        got = huber_parameter(T, _scheduler().alphas_cumprod, 1000,
                              LossOptions(huber_schedule=schedule, huber_c=c, huber_scale=scale))
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, err_msg=schedule)
    snr_c = huber_parameter(T, _scheduler().alphas_cumprod, 1000, LossOptions(huber_schedule="snr"))
    assert snr_c[0] > 0.9 and snr_c[-1] == pytest.approx(0.1, abs=0.01)  # ~1 at clean timesteps, ~c at noisy ones


def test_snr_weights_of_each_option_and_their_product() -> None:
    a = _alphas()[T.numpy()]
    snr = a / (1 - a)
    capped = np.minimum(snr, 1000)
    alphas = _scheduler().alphas_cumprod
    gamma = 5.0
    expected = {
        ("epsilon", "min_snr"): np.minimum(snr, gamma) / snr,
        ("v_prediction", "min_snr"): np.minimum(snr, gamma) / (snr + 1),
        ("epsilon", "debiased"): 1 / np.sqrt(capped),
        ("v_prediction", "debiased"): 1 / (capped + 1),
        ("v_prediction", "scale_v"): capped / (capped + 1),
    }
    flags = {"min_snr": {"min_snr_gamma": gamma}, "debiased": {"debiased_estimation": True},
             "scale_v": {"scale_v_pred_loss_like_noise_pred": True}}
    for (prediction, option), want in expected.items():
        got = snr_weights(T, alphas, prediction, LossOptions(**flags[option]))  # type: ignore[arg-type]
        assert got is not None
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, err_msg=f"{prediction} {option}")
    # kohya's add_v_prediction_like_loss on a per-sample loss of 1: 1 + 1 / (capped / (capped + 1)) * 0.2.
    v_like = snr_weights(T, alphas, "epsilon", LossOptions(v_pred_like_loss=0.2))
    assert v_like is not None
    np.testing.assert_allclose(v_like.double().numpy(), 1 + 1 / (capped / (capped + 1)) * 0.2, rtol=1e-5)
    every = LossOptions(min_snr_gamma=gamma, debiased_estimation=True, scale_v_pred_loss_like_noise_pred=True,
                        v_pred_like_loss=0.2)
    product = snr_weights(T, alphas, "v_prediction", every)
    assert product is not None
    want = (expected[("v_prediction", "min_snr")] * expected[("v_prediction", "scale_v")]
            * (1 + 1 / (capped / (capped + 1)) * 0.2) * expected[("v_prediction", "debiased")])
    np.testing.assert_allclose(product.double().numpy(), want, rtol=1e-5)
    assert snr_weights(T, alphas, "epsilon", LossOptions()) is None


def test_zero_terminal_snr_rescales_the_betas_as_kohya() -> None:
    betas = _scheduler().betas.double().numpy()
    # sd-scripts' fix_noise_scheduler_betas_for_zero_terminal_snr, in numpy.
    root = np.sqrt(np.cumprod(1 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    bar = root**2
    want = np.cumprod(np.concatenate([bar[:1], bar[1:] / bar[:-1]]))
    cfg = TrainingConfig(zero_terminal_snr=True)
    got = training_scheduler(_scheduler(), cfg).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert got[-1] == 0 and got[0] == pytest.approx(np.cumprod(1 - betas)[0])
    plain = _scheduler()
    assert training_scheduler(plain, TrainingConfig()) is plain


def test_timestep_range() -> None:
    generators = sample_generators(3, 0, list(range(2000)))
    t = draw_timesteps(generators, NoiseOptions(min_timestep=200, max_timestep=300))
    assert t.min().item() == 200 and t.max().item() == 299 and t.dtype == torch.long
    fixed = draw_timesteps(generators[:5], NoiseOptions(min_timestep=400, max_timestep=400))
    assert fixed.tolist() == [400] * 5
    # The default range draws what torch.randint(0, 1000) draws from the same generator.
    default = draw_timesteps(sample_generators(3, 0, [0, 1]), NoiseOptions())
    replay = [torch.randint(0, 1000, (1,), generator=g).item() for g in sample_generators(3, 0, [0, 1])]
    assert default.tolist() == replay


def _replayed_noise(latents: torch.Tensor, index: int, options: NoiseOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of sample ``index`` from its own generator, following kohya's get_noise_noisy_latents_and_
    timesteps / apply_noise_offset / pyramid_noise_like step by step, with the per-batch numbers drawn from the
    sample's generator."""
    g = sample_generators(9, 4, [index])[0]
    sample = latents[index].double()
    c, h, w = sample.shape
    noise = torch.randn((c, h, w), generator=g).double()
    if options.offset:
        offset = torch.rand((1,), generator=g).item() * options.offset if options.offset_random_strength \
            else options.offset
        offset = offset + options.adaptive_scale * sample.mean(dim=(1, 2), keepdim=True).abs()
        offset = torch.clamp(torch.as_tensor(offset), min=0.0)
        noise = noise + offset * torch.randn((c, 1, 1), generator=g).double()
    if options.multires_iterations:
        upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
        for i in range(options.multires_iterations):
            r = torch.rand((), generator=g).item() * 2 + 2
            hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
            coarse = upsample(torch.randn((1, c, hn, wn), generator=g))[0].double()
            noise = noise + coarse * options.multires_discount**i
            if hn == 1 or wn == 1:
                break
        noise = noise / noise.std()
    if not options.ip_gamma:
        return noise, noise
    strength = torch.rand((1,), generator=g).item() * options.ip_gamma if options.ip_random_strength \
        else options.ip_gamma
    return noise, noise + strength * torch.randn((c, h, w), generator=g).double()


@pytest.mark.parametrize("options", [
    NoiseOptions(),
    NoiseOptions(offset=0.1),
    NoiseOptions(offset=0.1, offset_random_strength=True, adaptive_scale=0.5),
    NoiseOptions(offset=0.05, adaptive_scale=-2.0),  # a negative adaptive scale is clamped at 0
    NoiseOptions(multires_iterations=6, multires_discount=0.3),
    NoiseOptions(multires_iterations=8, multires_discount=0.8, offset=0.1, ip_gamma=0.1),
    NoiseOptions(ip_gamma=0.1, ip_random_strength=True),
], ids=["plain", "offset", "offset_random_adaptive", "negative_adaptive", "multires", "everything", "ip_random"])
def test_noise_options_replayed_by_hand(options: NoiseOptions) -> None:
    latents = torch.randn(4, 4, 16, 12, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.3
    noise, input_noise = draw_noise(latents, sample_generators(9, 4, [0, 1, 2, 3]), options)
    for i in range(4):
        want_noise, want_input = _replayed_noise(latents, i, options)
        torch.testing.assert_close(noise[i].double(), want_noise, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(input_noise[i].double(), want_input, rtol=1e-5, atol=1e-5)
    if options.multires_iterations:
        assert all(abs(noise[i].std().item() - 1) < 1e-5 for i in range(4))
    # Keyed per sample: the same noise whether the batch is drawn whole or in halves.
    halves = [draw_noise(latents[s], sample_generators(9, 4, list(range(4))[s]), options)
              for s in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat([h[0] for h in halves]), noise)
    assert torch.equal(torch.cat([h[1] for h in halves]), input_noise)


def test_offset_spreads_the_channel_means_and_ip_noise_leaves_the_target() -> None:
    latents = torch.zeros(64, 4, 8, 8)
    generators = sample_generators(0, 0, list(range(64)))
    plain, _ = draw_noise(latents, generators, NoiseOptions())
    offset, _ = draw_noise(latents, sample_generators(0, 0, list(range(64))), NoiseOptions(offset=0.5))
    assert offset.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()
    target, perturbed = draw_noise(latents, sample_generators(0, 0, list(range(64))), NoiseOptions(ip_gamma=0.1))
    assert torch.equal(target, plain)
    assert (perturbed - target).std().item() == pytest.approx(0.1, rel=0.05)


def _training(**changes: object) -> TrainingConfig:
    return replace(TrainingConfig(), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "prediction", "num_t", "message"), [
    ({"adaptive_noise_scale": 0.5}, None, None, r"adaptive_noise_scale = 0\.5 .*noise_offset is 0\.0"),
    ({"min_timestep": 500, "max_timestep": 100}, None, None, r"min_timestep = 500 is above .*max_timestep = 100"),
    ({"zero_terminal_snr": True}, "epsilon", None, r"zero_terminal_snr = true needs a v_prediction model"),
    ({"scale_v_pred_loss_like_noise_pred": True}, "epsilon", None, r"scale_v_pred_loss_like_noise_pred"),
    ({"max_timestep": 1000}, None, 500, r"max_timestep = 1000 is beyond the model's 500"),
    ({"zero_terminal_snr": True, "v_pred_like_loss": 0.1}, "v_prediction", 1000,
     r"v_pred_like_loss = 0\.1 divides .* 0 at the last timestep \(999\).*max_timestep = 999"),
])
def test_contradictory_options_are_refused(changes: dict[str, object], prediction: str | None, num_t: int | None,
                                           message: str) -> None:
    with pytest.raises(ObjectiveError, match=message):
        check_objective(_training(**changes), prediction, num_t)


def test_consistent_options_pass() -> None:
    check_objective(_training(zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True), "v_prediction", 1000)
    check_objective(_training(zero_terminal_snr=True), None)  # prediction type not known yet: checked after loading
    check_objective(_training(zero_terminal_snr=True, v_pred_like_loss=0.1, max_timestep=999), "v_prediction", 1000)
    check_objective(_training(noise_offset=0.1, adaptive_noise_scale=-0.5, min_timestep=300, max_timestep=300))
