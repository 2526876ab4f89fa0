"""The noise and timesteps of a training step, with kohya's noise options, drawn per sample.

Every draw comes from the sample's own generator (``diffusion.sample_generators``), so a sample's noise
does not depend on the batch it shares, the rank it is on or whether the run was resumed. Where kohya
draws one number per batch (the random strengths, the pyramid's level ratios), the draw here is per
sample: for a batch of one the two agree. Options that are off draw nothing, so a generator's sequence
(timestep, VAE posterior, noise, ...) is the same whether or not an option exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_lora.train.diffusion import per_sample_normal


@dataclass(frozen=True)
class NoiseOptions:
    offset: float = 0.0
    offset_random_strength: bool = False
    adaptive_scale: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    ip_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000


def per_sample_uniform(generators: list[torch.Generator]) -> torch.Tensor:
    """One draw in [0, 1) per sample."""
    return torch.cat([torch.rand((1,), generator=g, device=g.device) for g in generators])


def draw_timesteps(generators: list[torch.Generator], options: NoiseOptions) -> torch.Tensor:
    """A timestep per sample, uniform in [min_timestep, max_timestep); with the two equal, that timestep."""
    lo, hi = options.min_timestep, options.max_timestep
    if lo == hi:
        return torch.full((len(generators),), lo, dtype=torch.long, device=generators[0].device)
    return torch.cat([torch.randint(lo, hi, (1,), generator=g, device=g.device) for g in generators])


def _offset_noise(latents: torch.Tensor, generators: list[torch.Generator], options: NoiseOptions) -> torch.Tensor:
    """kohya's noise offset: a constant per sample and channel, its scale optionally drawn and adapted to
    the absolute channel mean of the latents."""
    n, channels = latents.shape[:2]
    strength = torch.full((n,), options.offset, device=latents.device)
    if options.offset_random_strength:
        strength = per_sample_uniform(generators).to(latents.device, non_blocking=True) * options.offset
    strength = strength.view(n, 1, 1, 1)
    if options.adaptive_scale:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + options.adaptive_scale * channel_mean).clamp(min=0.0)
    return strength * per_sample_normal((channels, 1, 1), generators)


def _pyramid(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise of one sample [C, H, W] (kohya's pyramid_noise_like): coarser draws, each
    level's size divided by r^i for a ratio r drawn in [2, 4), upsampled bilinearly and added with weight
    discount^i, then rescaled to unit standard deviation (kohya divides by the whole batch's standard
    deviation; this sample's own keeps its noise independent of the batch)."""
    channels, height, width = noise.shape
    for i in range(iterations):
        ratio = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        h, w = max(1, int(height / ratio**i)), max(1, int(width / ratio**i))
        coarse = torch.randn((1, channels, h, w), generator=generator, device=generator.device)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**i
        if h == 1 or w == 1:
            break  # the coarsest level is reached
    return noise / noise.std()


def draw_noise(latents: torch.Tensor, generators: list[torch.Generator],
               options: NoiseOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(the noise the model learns to remove, the noise added to its input), in fp32.

    The two are the same tensor unless input perturbation is on (Ning et al. 2023): the input's noise
    then carries ``ip_noise_gamma`` times a further draw, the target does not."""
    noise = per_sample_normal(tuple(latents.shape[1:]), generators).to(latents.device, non_blocking=True)
    if options.offset > 0:
        noise = noise + _offset_noise(latents, generators, options).to(noise.device, non_blocking=True)
    if options.multires_iterations > 0:
        noise = torch.stack([_pyramid(sample, g, options.multires_iterations, options.multires_discount)
                             for sample, g in zip(noise, generators, strict=True)])
    if options.ip_gamma <= 0:
        return noise, noise
    strength = torch.full((len(generators),), options.ip_gamma, device=noise.device)
    if options.ip_random_strength:
        strength = per_sample_uniform(generators).to(noise.device, non_blocking=True) * options.ip_gamma
    perturbation = per_sample_normal(tuple(latents.shape[1:]), generators).to(noise.device, non_blocking=True)
    return noise, noise + strength.view(-1, 1, 1, 1) * perturbation
