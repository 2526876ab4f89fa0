"""The diffusion loss of a batch, shared by the training step and validation: noisy latents, the
model's prediction, the target of the model's prediction type, the per-element loss (masked where
masks are given) and its mean per sample."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_lora.train.diffusion import add_noise, training_target
from dist_lora.train.losses import LossOptions, elementwise_loss, huber_parameter, mask_weights, snr_weights

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, timesteps) -> prediction


class DiffusionLoss:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, num_train_timesteps: int,
                 options: LossOptions | None = None) -> None:
        # ``alphas_cumprod`` on the device, once: indexing a CPU schedule by device timesteps copies it over
        # (a blocking host-to-device copy) at every use, several per micro-step with v-prediction or min-SNR.
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.num_train_timesteps, self.options = num_train_timesteps, options or LossOptions()

    def per_sample(self, denoise: Denoiser, latents: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor,
                   timesteps: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of each sample (fp32). ``input_noise`` is what is added to the latents (it differs
        from the target's ``noise`` with ip_noise_gamma); ``masks`` uint8 [B, 1, H, W] weigh each pixel."""
        prediction = denoise(add_noise(latents, input_noise, timesteps, self.alphas_cumprod), timesteps)
        target = training_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        huber_c = None
        if self.options.loss_type in ("huber", "smooth_l1"):
            huber_c = huber_parameter(timesteps, self.alphas_cumprod, self.num_train_timesteps, self.options)
        per_element = elementwise_loss(prediction, target, self.options, huber_c)
        if masks is not None:  # masked loss: a pixel's loss counts by its mask (0 = not at all)
            per_element = per_element * mask_weights(masks, tuple(per_element.shape[-2:]))
        return per_element.mean(dim=list(range(1, per_element.ndim)))

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The SNR-dependent per-sample weights the options turn on (min-SNR, debiased, ...); None: none."""
        return snr_weights(timesteps, self.alphas_cumprod, self.prediction_type, self.options)
