"""kohya's loss options as pure functions: the per-element loss (l2, l1, huber, smooth_l1 with a Huber
parameter per timestep), the per-pixel weights of masked loss and the per-sample weights that depend on
the timestep's SNR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from dist_lora.train.diffusion import alphas_cumprod_at, min_snr_weights

SNR_CAP = 1000.0  # kohya caps the SNR where it divides by it (t = 0 has SNR near 1/(1 - a_0) ~ 1000+)


@dataclass(frozen=True)
class LossOptions:
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    debiased_estimation: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0


def huber_parameter(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int,
                    options: LossOptions) -> torch.Tensor:
    """The Huber c of each sample (kohya's get_huber_threshold_if_needed)."""
    t = timesteps.float()
    if options.huber_schedule == "constant":
        return torch.full_like(t, options.huber_c * options.huber_scale)
    if options.huber_schedule == "exponential":
        decay = -math.log(options.huber_c) / num_train_timesteps
        return torch.exp(-decay * t) * options.huber_scale
    if options.huber_schedule == "snr":
        a = alphas_cumprod_at(alphas_cumprod, timesteps)
        sigma = ((1.0 - a) / a).sqrt()
        return (1.0 - options.huber_c) / (1.0 + sigma) ** 2 + options.huber_c
    raise ValueError(f"unknown huber_schedule {options.huber_schedule!r}; expected constant, exponential or snr")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, options: LossOptions,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss in fp32 (kohya's conditional_loss with reduction 'none')."""
    difference = prediction.float() - target.float()
    if options.loss_type == "l2":
        return difference.square()
    if options.loss_type == "l1":
        return difference.abs()
    if options.loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {options.loss_type!r} needs the Huber parameter of each sample")
        c = huber_c.float().view(-1, *([1] * (difference.ndim - 1)))
        smooth = torch.sqrt(difference.square() + c.square()) - c
        return 2 * c * smooth if options.loss_type == "huber" else 2 * smooth
    raise ValueError(f"unknown loss_type {options.loss_type!r}; expected l2, l1, huber or smooth_l1")


def mask_weights(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (uint8 [B, 1, H, W], 255 = full weight) as per-element loss weights on the ``size`` grid of the
    latents: area-averaged, as kohya's apply_masked_loss resizes them."""
    return F.interpolate(masks.float() / 255.0, size=size, mode="area")


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                options: LossOptions) -> torch.Tensor | None:
    """The product of the SNR-dependent per-sample weights that are on, in kohya's order (min-SNR,
    v-like-eps scaling, the added v-like loss, debiased estimation); None when none is."""
    weights: torch.Tensor | None = None
    a = alphas_cumprod_at(alphas_cumprod, timesteps)
    capped = torch.clamp(a / (1 - a), max=SNR_CAP)
    v_prediction = prediction_type == "v_prediction"

    def times(w: torch.Tensor) -> torch.Tensor:
        return w if weights is None else weights * w

    if options.min_snr_gamma > 0:
        weights = times(min_snr_weights(alphas_cumprod, timesteps, options.min_snr_gamma, prediction_type))
    if options.scale_v_pred_loss_like_noise_pred:
        weights = times(capped / (capped + 1))
    if options.v_pred_like_loss > 0:
        # kohya's add_v_prediction_like_loss: loss + loss / (SNR / (SNR + 1)) * v_pred_like_loss.
        weights = times(1 + options.v_pred_like_loss * (capped + 1) / capped)
    if options.debiased_estimation:
        weights = times(1 / (capped + 1) if v_prediction else 1 / capped.sqrt())
    return weights
