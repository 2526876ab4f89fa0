"""The trained module: UNet (with adapters) plus, when any of them is trained, the text encoders.

Keeping everything that receives gradients in one ``nn.Module`` lets the parallel layer wrap exactly
one model (DDP and DeepSpeed both want that) while the frozen VAE and frozen encoders stay outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dist_lora.models.text import DEFAULT_TEXT_ENCODING, TextEncoding, encode_prompts


class AdaptedDenoiser(nn.Module):
    def __init__(self, unet: nn.Module, trained_text_encoders: Sequence[nn.Module], family: str,
                 text_encoding: TextEncoding = DEFAULT_TEXT_ENCODING) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoders = nn.ModuleList(trained_text_encoders)
        self.family = family
        self.text_encoding = text_encoding

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, *,
                input_ids: Sequence[torch.Tensor] | None = None,
                hidden_states: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the UNet target. Pass ``input_ids`` when the encoders are trained (they live here),
        else the precomputed ``hidden_states`` (and ``pooled`` for SDXL)."""
        if len(self.text_encoders) > 0:
            assert input_ids is not None, "trained text encoders need input_ids"
            hidden_states, pooled = encode_prompts(list(self.text_encoders), input_ids, self.family,
                                                   self.text_encoding)
        assert hidden_states is not None
        added = None
        if self.family == "sdxl":
            assert pooled is not None and time_ids is not None
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]
