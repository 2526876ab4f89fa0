"""The loss of one micro-batch."""

from __future__ import annotations

import torch

from dist_lora.config import Config
from dist_lora.data.shards import Batch
from dist_lora.parallel import World
from dist_lora.train.conditioning import Conditioner
from dist_lora.train.diffusion import sample_generators
from dist_lora.train.diffusion_loss import DiffusionLoss
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
        self.noise_options = noise_options(cfg.training)
        self.objective = DiffusionLoss(self.c.noise_scheduler.alphas_cumprod.to(conditioner.device),
                                       self.c.prediction_type, int(self.c.noise_scheduler.config.num_train_timesteps),
                                       loss_options(cfg.training))

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
        inputs = cond.model_inputs(batch)
        per_sample = self.objective.per_sample(lambda noisy, t: self.setup.model(noisy, t, **inputs), latents, noise,
                                               input_noise, timesteps,
                                               cond.to_device(batch.masks) if batch.masks is not None else None)
        # Padding samples weigh 0 and regularization images prior_loss_weight; the mean stays over the
        # whole batch, so a real sample's gradient does not depend on how much padding shares its batch.
        prior = self.cfg.training.prior_loss_weight
        weights = batch.weights.clone()
        for i, meta in enumerate(batch.metas):
            if meta.get("is_reg"):
                weights[i] *= prior
        weights = cond.to_device(weights)
        snr_weighting = self.objective.timestep_weights(timesteps)
        if snr_weighting is not None:
            weights = weights * snr_weighting
        return (per_sample * weights).mean()
