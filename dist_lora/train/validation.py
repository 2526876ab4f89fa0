"""Validation loss on a held-out set, as a step hook.

Every sample's timestep, VAE posterior draw and noise come from a generator keyed by (seed, sample key)
alone, so an evaluation of the same adapter gives the same number every time, and the curve moves only
because the adapter does. Where the set holds masks and training.masked_loss is on, each pixel's
loss counts by its mask, as in training. Each rank evaluates its share of the set (padding weighs 0);
per-sample losses and counts are summed over all ranks in one all-reduce, so the mean is the same on
any number of ranks (up to the order of a float sum).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from dist_lora import parallel
from dist_lora.config import Config
from dist_lora.data.shards import ShardLoader
from dist_lora.train.conditioning import Conditioner
from dist_lora.train.diffusion import key_generators
from dist_lora.train.diffusion_loss import DiffusionLoss
from dist_lora.train.eval_mode import eval_mode
from dist_lora.train.hooks import HookContext, Schedule, Scope
from dist_lora.train.noise import NoiseOptions, draw_noise, draw_timesteps
from dist_lora.train.optimizer_modes import averaged_weights
from dist_lora.train.setup import Setup
from dist_lora.train.tracking import MetricsLog, read_validation_log


class ValidationHook:
    name = "validation"
    scope = Scope.ALL_RANKS

    def __init__(self, cfg: Config, loader: ShardLoader, setup: Setup, conditioner: Conditioner,
                 accelerator: Accelerator, metrics: MetricsLog) -> None:
        self.schedule = Schedule(every_steps=cfg.validation.every_steps, at_end=True)
        self.cfg, self.loader, self.setup, self.conditioner = cfg, loader, setup, conditioner
        self.acc, self.metrics = accelerator, metrics
        self._last_step = -1

    def run(self, ctx: HookContext) -> None:
        if ctx.step == self._last_step or ctx.stop_requested:
            return  # evaluated at this step already (the last step), or a stop comes first
        self._last_step = ctx.step
        self.metrics.log_validation(ctx.step, self.evaluate())

    @torch.no_grad()
    def evaluate(self) -> float:
        setup, cond = self.setup, self.conditioner
        c = setup.components
        module = parallel.forward_module(self.acc, setup.model)
        # Plain noise over the whole schedule and the l2 loss, whatever the training options: losses
        # comparable across runs.
        num_timesteps = int(c.noise_scheduler.config.num_train_timesteps)
        plain = NoiseOptions(max_timestep=num_timesteps)
        objective = DiffusionLoss(c.noise_scheduler.alphas_cumprod.to(cond.device), c.prediction_type, num_timesteps)
        totals = torch.zeros(2, device=cond.device)
        # Offloaded encoders come to the device once per round, not per batch.
        with averaged_weights(setup.optimizer), eval_mode([module]), cond.frozen_on_device():
            for batch in self.loader.epoch(0):
                generators = key_generators(self.cfg.training.seed, batch.keys, cond.device)
                timesteps = draw_timesteps(generators, plain)
                latents = cond.latents(batch, generators)
                noise = draw_noise(latents, generators, plain)[0].to(latents.dtype)
                inputs = cond.model_inputs(batch)

                def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    with self.acc.autocast():
                        return module(noisy, t, **inputs)  # noqa: B023 - called within this iteration

                masks = cond.to_device(batch.masks) if batch.masks is not None else None  # as training weighs it
                per_sample = objective.per_sample(denoise, latents, noise, noise, timesteps, masks)
                weights = cond.to_device(batch.weights)
                totals += torch.stack([(per_sample * weights).sum(), weights.sum()])
        loss_sum, count = parallel.sum_tensor_across_ranks(self.acc, totals).tolist()
        return loss_sum / max(count, 1.0)


def best_validation(run_dir: Path, adapter: Path, final_step: int, step_file: Any) -> dict[str, Any] | None:
    """The evaluated step with the lowest validation loss, and the adapter file of that step if one was
    written (the run's own file for the last step; an intermediate file otherwise)."""
    records = read_validation_log(run_dir)
    if not records:
        return None
    step, loss = min(records, key=lambda r: (r[1], r[0]))
    candidate = adapter if step == final_step else step_file(step)
    return {"step": step, "val_loss": loss, "file": str(candidate) if candidate.is_file() else None}
