"""Prompt conditioning: tokenise captions and turn them into the UNet's cross-attention inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def tokenize(tokenizers: Sequence[Any], captions: Sequence[str]) -> list[torch.Tensor]:
    """One ``[batch, max_length]`` id tensor per tokenizer, padded and truncated like the pipelines."""
    return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


def encode_prompts(text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                   family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states for cross-attention, and for SDXL the pooled projection of the second encoder.

    SD 1.x/2.x: the last hidden state (as diffusers' pipelines). SDXL: the penultimate hidden states
    of both encoders concatenated on the feature axis, as the SDXL pipeline builds them.
    """
    if family != "sdxl":
        encoder = text_encoders[0]
        ids = input_ids[0].to(next(encoder.parameters()).device)
        return encoder(ids)[0], None
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # after the loop: the second encoder's projected pooled output
    return torch.cat(hidden, dim=-1), pooled
