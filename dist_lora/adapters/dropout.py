"""kohya's rank dropout and module dropout on LoRA adapters, with masks drawn per sample.

kohya (networks/lora.py) and LyCORIS, in training only:
- rank dropout: each rank channel of the down projection's output is zeroed with probability p and
  the rest scaled by 1 / (1 - p), drawn per sample;
- module dropout: the whole adapter is skipped with probability p (kohya draws once per forward call,
  that is per batch).

Here every mask comes from the sample's own generator (the training step's), module dropout included,
so a sample's masks do not depend on the batch it shares, the rank it runs on or a resume; for a batch
of one they are kohya's. The masks stay set for the step, so a gradient-checkpointing recomputation sees
the same ones. Layers in eval mode (validation, sampling) are never masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dist_lora.adapters.inject import ADAPTER_NAME


class AdapterDropout:
    """Forward hooks on the down (rank mask) and up (module mask) projections of peft LoRA layers."""

    def __init__(self, layers: Sequence[nn.Module], rank_dropout: float, module_dropout: float) -> None:
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.ranks = [int(layer.r[ADAPTER_NAME]) for layer in layers]  # type: ignore[index]
        self._rank_masks: list[torch.Tensor] | None = None
        self._keep: torch.Tensor | None = None
        for index, layer in enumerate(layers):
            if rank_dropout > 0:
                layer.lora_A[ADAPTER_NAME].register_forward_hook(self._rank_hook(index))  # type: ignore[index]
            if module_dropout > 0:
                layer.lora_B[ADAPTER_NAME].register_forward_hook(self._module_hook(index))  # type: ignore[index]

    @property
    def draws_per_sample(self) -> int:
        return (sum(self.ranks) if self.rank_dropout > 0 else 0) + (len(self.ranks) if self.module_dropout > 0 else 0)

    def draw(self, generators: Sequence[torch.Generator], device: torch.device) -> None:
        """This step's masks: one uniform draw per rank channel and per module from each sample's generator
        (after the sample's noise draws)."""
        uniform = torch.stack([torch.rand(self.draws_per_sample, generator=g, device=g.device)
                               for g in generators]).to(device)
        used = 0
        if self.rank_dropout > 0:
            total = sum(self.ranks)
            kept = (uniform[:, :total] > self.rank_dropout).float() / (1 - self.rank_dropout)
            self._rank_masks = list(kept.split(self.ranks, dim=1))
            used = total
        if self.module_dropout > 0:
            self._keep = (uniform[:, used:] >= self.module_dropout).float()

    def _check_batch(self, output: torch.Tensor, mask: torch.Tensor) -> None:
        if output.shape[0] != mask.shape[0]:
            raise RuntimeError(f"adapter dropout masks were drawn for {mask.shape[0]} samples but a layer ran on "
                               f"{output.shape[0]}")

    def _rank_hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not module.training or self._rank_masks is None:
                return output
            mask = self._rank_masks[index]
            self._check_batch(output, mask)
            # [B, r] against [B, r] (pooled), [B, T, r] (tokens) or [B, r, H, W] (convolutions).
            shape = (mask.shape[0], mask.shape[1], 1, 1) if output.dim() == 4 else \
                (mask.shape[0], *([1] * (output.dim() - 2)), mask.shape[1])
            return output * mask.view(shape).to(output.dtype)
        return hook

    def _module_hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not module.training or self._keep is None:
                return output
            keep = self._keep[:, index]
            self._check_batch(output, keep)
            return output * keep.view(-1, *([1] * (output.dim() - 1))).to(output.dtype)
        return hook
