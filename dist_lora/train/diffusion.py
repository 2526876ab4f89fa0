"""The diffusion training objective as pure functions of tensors (no model, no device logic)."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F


def alphas_cumprod_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    # Callers keep the schedule on the device (a no-op then); a host copy would be copied without a wait.
    return alphas_cumprod.to(timesteps.device, non_blocking=True)[timesteps].float()


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a = alphas_cumprod_at(alphas_cumprod, timesteps).view(-1, *([1] * (latents.ndim - 1)))
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to predict: eps, or the velocity v = sqrt(a) eps - sqrt(1-a) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod_at(alphas_cumprod, timesteps).view(-1, *([1] * (latents.ndim - 1)))
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod_at(alphas_cumprod, timesteps)
    return a / (1 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for eps or v targets."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32, optionally weighted per sample."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=list(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> list[int]:
    """SDXL micro-conditioning vector: (orig h, orig w, crop top, crop left, target h, target w)."""
    return [*original_size, *crop_top_left, *target_size]


def sample_generators(seed: int, step: int, global_indices: list[int],
                      device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded from (seed, optimizer step, the sample's position in the global
    batch). The noise a sample gets is then the same however the global batch is split over ranks and
    accumulation micro-steps, and a resumed run draws exactly what the uninterrupted one drew.

    The generators live on ``device`` so the draws are made where they are used (no host-to-device copy
    of the noise each step); CUDA's generator gives other numbers than the CPU's, the same on every GPU."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 65_537 + i)
            for i in global_indices]


def key_generators(seed: int, keys: list[str], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample seeded from (seed, the sample's key) alone: the same draws at every
    evaluation, whatever the batch, the rank or the step (validation). Padding copies share their
    sample's draws; they weigh 0."""
    return [torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}/{k.removeprefix('pad:')}".encode()))
            for k in keys]


def per_sample_normal(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])
