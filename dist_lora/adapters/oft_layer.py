"""The OFT / BOFT adapter layer: a base Linear or Conv2d whose output channels are rotated (see ``orthogonal``).

peft has OFT and BOFT, but rotates the layer's *input* (``W R``) with an approximate (Neumann series) Cayley
transform; the files AUTOMATIC1111, ComfyUI, LyCORIS and kohya read rotate the *output* rows (``R^T W``) with
the exact one, and neither can be converted into the other. This layer computes what those loaders compute,
on the base layer's output, so it never reads the base weight in training (a ZeRO-3 shard, an fp8 or nf4
base all work unchanged): ``y' = y + rotation change of (y - bias)``.

It is a peft tuner layer (``BaseTunerLayer``) like the LoRA/LoHa/LoKr ones, with its blocks in
``oft_blocks.<adapter>``, so what walks adapter layers (parameters, EMA, checkpoints, multipliers) sees it.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dist_lora.adapters.orthogonal import constrained_blocks, rotate_channels, rotation_change, weight_change


def out_channels(module: nn.Module) -> int:
    """A Linear's or Conv2d's output channels, seen through any adapter layer wrapping it."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    for name in ("out_features", "out_channels"):
        if isinstance(getattr(module, name, None), int):
            return int(getattr(module, name))
    return int(module.weight.shape[0])  # type: ignore[union-attr, index]


class OrthogonalLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("oft_blocks",)
    other_param_names = ("constraint", "multiplier", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, shape: tuple[int, ...], constraint: float = 0.0,
                 module_dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # Zero blocks: Q = 0, R = I, so training starts from the unchanged model.
        self.oft_blocks = nn.ParameterDict({adapter_name: nn.Parameter(
            torch.zeros(shape, device=weight.device, dtype=torch.float32))})
        self.constraint = {adapter_name: float(constraint)}  # absolute bound on ||Q||; 0: none
        self.multiplier = {adapter_name: 1.0}
        self.module_dropout = {adapter_name: float(module_dropout)}
        self.scaling = {adapter_name: 1.0}  # what marks a peft layer as holding this adapter
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.kwargs: dict[str, object] = {}

    def set_blocks(self, adapter_name: str, blocks: torch.Tensor, constraint: float) -> None:
        """Replace the adapter's blocks (shapes may differ from the injection's) and its constraint."""
        device = self.oft_blocks[adapter_name].device
        self.oft_blocks[adapter_name] = nn.Parameter(blocks.detach().clone().float().to(device))
        self.constraint[adapter_name] = float(constraint)

    def effective_blocks(self, adapter_name: str) -> torch.Tensor:
        """The blocks with the constraint applied: what a loader applying no constraint needs."""
        return constrained_blocks(self.oft_blocks[adapter_name].detach(), self.constraint[adapter_name])

    def scale_layer(self, scale: float) -> None:
        for name in self.multiplier:
            self.multiplier[name] = float(scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        for name in self.multiplier:
            self.multiplier[name] = 1.0

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The weight change at multiplier 1 (fp32)."""
        return weight_change(self.get_base_layer().weight.detach(), self.oft_blocks[adapter_name],
                             self.constraint[adapter_name])

    def merged_weight(self, multiplier: float, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer().weight.detach().float()
        return base + weight_change(base, self.oft_blocks[adapter_name], self.constraint[adapter_name], multiplier)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        base = self.get_base_layer()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.oft_blocks:
                continue
            if self.training and self.module_dropout[name] and torch.rand(()) < self.module_dropout[name]:
                continue
            changes = rotation_change(self.oft_blocks[name], self.constraint[name])
            channels = result.movedim(1, -1) if result.dim() == 4 else result
            bias = getattr(base, "bias", None)
            unbiased = channels - bias.to(channels.dtype) if bias is not None else channels
            change = rotate_channels(unbiased, changes, self.multiplier[name])
            result = result + (change.movedim(-1, 1) if result.dim() == 4 else change)
        return result

    def __repr__(self) -> str:
        return "oft." + super().__repr__()
