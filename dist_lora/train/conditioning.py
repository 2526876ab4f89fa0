"""The denoiser's inputs besides the noise: latents, prompt encodings and SDXL's size conditioning.

Training, sampling and validation compute them through this one class, so an image sampled during
training is conditioned exactly as a training step is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from dist_lora.data.shards import Batch
from dist_lora.data.stream import pixels_to_unit_range
from dist_lora.models.load import Components
from dist_lora.models.text import encode_prompts, tokenize
from dist_lora.train.diffusion import per_sample_normal, sdxl_time_ids
from dist_lora.train.offload import FrozenOffload, maybe_on_device


class Conditioner:
    def __init__(self, components: Components, device: torch.device, weight_dtype: torch.dtype,
                 frozen_text_encoders: list[nn.Module], autocast: Callable[[], AbstractContextManager[Any]],
                 cached_scaling_factor: float = 0.0, offload: FrozenOffload | None = None) -> None:
        self.components, self.device, self.weight_dtype = components, device, weight_dtype
        self.frozen_text_encoders, self.autocast = frozen_text_encoders, autocast
        self.cached_scaling_factor = cached_scaling_factor  # of the VAE that made cached latents
        self.offload = offload  # model.offload_frozen: the VAE / encoders visit the device only to encode

    def frozen_on_device(self) -> AbstractContextManager[None]:
        """The offloaded VAE and text encoders on the device for a whole block (a validation round)."""
        return maybe_on_device(self.offload, self.components.vae, *self.frozen_text_encoders)

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Host-to-device copy that does not make the host wait for the GPU: from pinned memory and
        non_blocking (the kernels that read it are queued on the same stream after the copy)."""
        if self.device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, dtype, non_blocking=True)

    @torch.no_grad()
    def latents(self, batch: Batch, generators: list[torch.Generator]) -> torch.Tensor:
        """A draw from the VAE posterior of each image, scaled; from the cache when the batch carries it."""
        if batch.latent_mean is not None and batch.latent_std is not None:
            mean, std = self.to_device(batch.latent_mean), self.to_device(batch.latent_std)
            scaling = self.cached_scaling_factor
        else:
            vae = self.components.vae
            assert vae is not None and batch.pixels is not None
            pixels = pixels_to_unit_range(self.to_device(batch.pixels), self.device, next(vae.parameters()).dtype)
            with maybe_on_device(self.offload, vae):
                dist = vae.encode(pixels).latent_dist
            mean, std, scaling = dist.mean, dist.std, vae.config.scaling_factor
        eps = per_sample_normal(tuple(mean.shape[1:]), generators).to(mean.dtype)
        return ((mean + std * eps) * scaling).to(self.weight_dtype)

    def text(self, captions: Sequence[str], hidden: torch.Tensor | None = None,
             pooled: torch.Tensor | None = None) -> dict[str, Any]:
        """The model's text inputs for ``captions``: cached encodings when given, encodings by the frozen
        encoders, or token ids when the encoders train inside the model."""
        if hidden is not None:
            dtype = self.weight_dtype
            return {"hidden_states": self.to_device(hidden, dtype),
                    "pooled": self.to_device(pooled, dtype) if pooled is not None else None}
        encoding = self.components.text_encoding
        input_ids = tokenize(self.components.tokenizers, list(captions), encoding)
        if self.frozen_text_encoders:
            with torch.no_grad(), self.autocast(), maybe_on_device(self.offload, *self.frozen_text_encoders):
                encoded, encoded_pooled = encode_prompts(self.frozen_text_encoders, input_ids,
                                                         self.components.family, encoding)
            return {"hidden_states": encoded, "pooled": encoded_pooled}
        return {"input_ids": [self.to_device(ids) for ids in input_ids]}

    def time_ids(self, metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """SDXL's size and crop conditioning of each sample ({} for SD 1.x / 2.x)."""
        if self.components.family != "sdxl":
            return {}
        rows = [sdxl_time_ids(tuple(m["original_size"]), tuple(m["crop_top_left"]), tuple(m["target_size"]))
                for m in metas]
        return {"time_ids": self.to_device(torch.tensor(rows), self.weight_dtype)}

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        """Everything the adapted denoiser takes for ``batch`` besides the noisy latents and timesteps."""
        return {**self.text(batch.captions, batch.hidden, batch.pooled), **self.time_ids(batch.metas)}
