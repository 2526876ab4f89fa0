"""The loss of one micro-batch."""

from __future__ import annotations

import torch

from dist_lora.config import Config
from dist_lora.data.shards import Batch
from dist_lora.parallel import World
from dist_lora.train.conditioning import Conditioner
from dist_lora.train.diffusion import add_noise, sample_generators, training_target
from dist_lora.train.losses import elementwise_loss, huber_parameter, mask_weights, snr_weights
from dist_lora.train.noise import draw_noise, draw_timesteps
from dist_lora.train.objective import loss_options, noise_options
from dist_lora.train.setup import Setup


class StepRunner:
    """Computes the loss of one micro-batch.

    Every random draw of a sample (timestep, VAE posterior sample, noise and its options) comes from its own
    generator keyed by (seed, optimizer step, position in the global batch), so runs agree whatever the
    split over ranks and accumulation, and a resumed run needs no generator state.
    """

    def __init__(self, cfg: Config, setup: Setup, conditioner: Conditioner, world: World) -> None:
        self.cfg, self.setup, self.conditioner, self.world = cfg, setup, conditioner, world
        self.c = setup.components
        # On the device once: indexing a CPU schedule by device timesteps copies it over (a blocking
        # host-to-device copy) at every use, several per micro-step with v-prediction, min-SNR or Huber.
        self.alphas_cumprod = self.c.noise_scheduler.alphas_cumprod.to(conditioner.device)
        self.num_train_timesteps = int(self.c.noise_scheduler.config.num_train_timesteps)
        self.noise_options, self.loss_options = noise_options(cfg.training), loss_options(cfg.training)

    def global_indices(self, micro_in_step: int, batch_size: int) -> list[int]:
        first = (micro_in_step * self.world.size + self.world.rank) * batch_size
        return list(range(first, first + batch_size))

    def loss(self, batch: Batch, step: int, micro_in_step: int) -> torch.Tensor:
        cond = self.conditioner
        generators = sample_generators(self.cfg.training.seed, step,
                                       self.global_indices(micro_in_step, len(batch.keys)), cond.device)
        timesteps = draw_timesteps(generators, self.noise_options)
        latents = cond.latents(batch, generators)
        noise, input_noise = draw_noise(latents, generators, self.noise_options)
        noise, input_noise = noise.to(latents.dtype), input_noise.to(latents.dtype)
        if self.setup.adapter_dropout is not None:  # after the noise: runs without it draw the same noise
            self.setup.adapter_dropout.draw(generators, cond.device)
        noisy = add_noise(latents, input_noise, timesteps, self.alphas_cumprod)
        prediction = self.setup.model(noisy, timesteps, **cond.model_inputs(batch))
        target = training_target(latents, noise, timesteps, self.alphas_cumprod, self.c.prediction_type)
        # Padding samples weigh 0 and regularization images prior_loss_weight; the mean stays over the
        # whole batch, so a real sample's gradient does not depend on how much padding shares its batch.
        prior = self.cfg.training.prior_loss_weight
        weights = batch.weights.clone()
        for i, meta in enumerate(batch.metas):
            if meta.get("is_reg"):
                weights[i] *= prior
        weights = cond.to_device(weights)
        snr_weighting = snr_weights(timesteps, self.alphas_cumprod, self.c.prediction_type, self.loss_options)
        if snr_weighting is not None:
            weights = weights * snr_weighting
        huber_c = None
        if self.loss_options.loss_type in ("huber", "smooth_l1"):
            huber_c = huber_parameter(timesteps, self.alphas_cumprod, self.num_train_timesteps, self.loss_options)
        per_element = elementwise_loss(prediction, target, self.loss_options, huber_c)
        if batch.masks is not None:  # masked loss: a pixel's loss counts by its mask (0 = not at all)
            per_element = per_element * mask_weights(cond.to_device(batch.masks), tuple(per_element.shape[-2:]))
        return (per_element.mean(dim=list(range(1, per_element.ndim))) * weights).mean()
