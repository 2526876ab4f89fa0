"""Sizes a memory plan needs, measured on the meta device: the models are built from their config JSON
(no weights are read or allocated), the adapters are attached as in training, and one forward pass
records every tensor autograd saves for the backward pass.

Attention is accounted as the fused SDPA kernels (flash / memory-efficient) save it on a GPU: q, k, v,
the output and one float per query row, never the L x L score matrix that a math fallback would keep.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.adapters.inject import lora_parameters
from dist_lora.adapters.network import attach_network
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.fp8_base import fp8_storable_params
from dist_lora.models.quantized_base import quantizable_params
from dist_lora.models.reference import sdxl_pooled_width

# Modules that diffusers (ResnetBlock2D, BasicTransformerBlock) and transformers (CLIPEncoderLayer) run
# under activation checkpointing when it is enabled.
CHECKPOINTED_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


class PlanInputError(DistLoraError):
    """The plan cannot be made from these inputs (missing model configs)."""


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes saved for backward by one sample's forward, without and with activation checkpointing."""

    plain: int
    checkpointed: int  # the peak of a checkpointed backward pass
    # Of ``checkpointed``: what the peak holds beyond what the forward pass kept (each unit's inputs and
    # what runs outside the units): the unit being recomputed and the gradient flowing through it.
    recomputed: int = 0


@dataclass(frozen=True)
class ModelSizes:
    family: str
    unet_params: int
    text_encoder_params: list[int]
    vae_params: int
    unet_adapter_params: int
    text_adapter_params: int
    unet_activations: ActivationBytes  # per sample, at the image size measured
    text_activations: ActivationBytes  # per sample, trained text encoders only (0 when not trained)
    vae_encode_peak: int  # per sample, no-grad VAE encode (online latents)
    largest_unet_layer_params: int  # what ZeRO-3 gathers at once
    image_size: tuple[int, int]
    # Weights that model.base_dtype = 'fp8' stores in one byte: frozen Linear / Conv2d weights (the rest,
    # biases, norms, embeddings, stays in the compute dtype).
    unet_fp8_params: int = 0
    text_fp8_params: tuple[int, ...] = ()
    unet_linear_params: int = 0  # frozen Linear weights: what nf4 / int8 quantise (convolutions stay)


class _FlashStyleAttention(torch.autograd.Function):
    """Shape-only SDPA that saves what fused kernels save (q, k, v, out, logsumexp)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if q.ndim == 4:
            # The fused kernels (CUDA flash / memory-efficient, and the CPU flash kernel) write the output
            # as (batch, tokens, heads, dim) and return it transposed to (batch, heads, tokens, dim): the
            # caller's transpose back and reshape to (batch, tokens, width) is then a view, not a copy.
            b, heads, tokens, _ = q.shape
            out = q.new_empty((b, tokens, heads, v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _flash_style_sdpa() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _FlashStyleAttention.apply(q, k, v)  # type: ignore[no-any-return]

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _SavedTensorLedger:
    """Counts the distinct tensors autograd saves, and how much of it each checkpointed unit saved."""

    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}  # kept alive so ids stay unique
        self.total = 0
        self.unit_saved: list[int] = []
        self.unit_inputs: list[int] = []
        self.kept_before: list[int] = []  # checkpointed: bytes the forward pass keeps when each unit starts
        self._unit_start: list[int] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.seen and not (isinstance(base, nn.Parameter)):
            self.seen[id(base)] = base
            self.total += _nbytes(base)
        return tensor

    def watch(self, model: nn.Module) -> list[Any]:
        handles = []
        for module in model.modules():
            if type(module).__name__ in CHECKPOINTED_UNITS:
                handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
                handles.append(module.register_forward_hook(self._leave))
        return handles

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.kept_before.append(self.total - sum(self.unit_saved) + sum(self.unit_inputs))
        self._unit_start.append(self.total)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self.unit_inputs.append(sum(_nbytes(t) for t in tensors if id(t) not in self.seen))

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.unit_saved.append(self.total - self._unit_start.pop())

    def activations(self) -> ActivationBytes:
        if not self.unit_saved:
            return ActivationBytes(self.total, self.total)
        # Checkpointing keeps each unit's inputs instead of its saved tensors, and recomputes one unit at a
        # time in the backward pass, last unit first. By the time unit i is recomputed, everything the
        # forward pass kept after it has been used and freed: what is alive is what was kept before it,
        # its inputs, its recomputed saved tensors and the gradient flowing through it (its input's size).
        kept = self.total - sum(self.unit_saved) + sum(self.unit_inputs)
        peak = max(before + 2 * inputs + saved
                   for before, inputs, saved in zip(self.kept_before, self.unit_inputs, self.unit_saved, strict=True))
        peak = min(max(peak, kept), self.total)
        return ActivationBytes(self.total, peak, peak - min(kept, peak))


def _measure(model: nn.Module, run: Any) -> ActivationBytes:
    ledger = _SavedTensorLedger()
    handles = ledger.watch(model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t), _flash_style_sdpa():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return ledger.activations()


def _read_config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    if not path.is_file():
        raise PlanInputError(f"'{path}' is missing: the plan reads each component's config.json from a diffusers "
                             f"folder (model.pretrained, or model.config_dir for a single-file checkpoint).")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_model(folder: Path, network: NetworkConfig, image_size: tuple[int, int],
                  compute_dtype: torch.dtype) -> ModelSizes:
    """Build the model described by ``folder`` on the meta device and measure what a plan needs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg = _read_config(folder, "unet")
    family = "sdxl" if (folder / "text_encoder_2").is_dir() else "sd1"
    height, width = image_size
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg).to(compute_dtype)
        vae = AutoencoderKL.from_config(_read_config(folder, "vae"))
        encoders: list[nn.Module] = [CLIPTextModel(CLIPTextConfig(**_read_config(folder, "text_encoder")))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_read_config(folder, "text_encoder_2"))))
        for module in [unet, vae, *encoders]:
            module.requires_grad_(False)
        encoders = [e.to(compute_dtype) for e in encoders]
        base = {"unet": _params(unet), "text": [_params(e) for e in encoders], "vae": _params(vae)}
        fp8 = {"unet": fp8_storable_params(unet), "text": tuple(fp8_storable_params(e) for e in encoders)}
        linear = quantizable_params(unet)
        largest = max((p.numel() for p in unet.parameters()), default=0)
        attached = attach_network(unet, encoders, family, network)
        unet_adapter = sum(p.numel() for p in lora_parameters(unet))
        text_adapter = sum(p.numel() for e in attached.trained_text_encoders for p in lora_parameters(e))
        # Autocast runs the fp32 adapters' matmuls in the compute dtype, so that is what they save.
        for module in [unet, *attached.trained_text_encoders]:
            module.to(compute_dtype)
        unet_acts = _measure(unet, lambda: _unet_forward(unet, family, height, width, compute_dtype))
        text_acts = ActivationBytes(0, 0)
        for encoder in attached.trained_text_encoders:
            one = _measure(encoder, lambda e=encoder: e(torch.zeros(1, 77, dtype=torch.long)))
            text_acts = ActivationBytes(text_acts.plain + one.plain, text_acts.checkpointed + one.checkpointed)
        vae_peak = _vae_encode_peak(vae, height, width)
    return ModelSizes(family, base["unet"], base["text"], base["vae"], unet_adapter, text_adapter, unet_acts,
                      text_acts, vae_peak, largest, image_size, fp8["unet"], fp8["text"], linear)


def _unet_forward(unet: nn.Module, family: str, height: int, width: int, dtype: torch.dtype) -> None:
    config = unet.config  # type: ignore[attr-defined]
    latents = torch.empty(1, config.in_channels, height // 8, width // 8, dtype=dtype)
    context = torch.empty(1, 77, config.cross_attention_dim, dtype=dtype)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.empty(1, sdxl_pooled_width(config), dtype=dtype),
                 "time_ids": torch.empty(1, 6, dtype=dtype)}
    unet(latents, torch.empty(1, dtype=torch.long), encoder_hidden_states=context, added_cond_kwargs=added)


def _vae_encode_peak(vae: nn.Module, height: int, width: int) -> int:
    """No-grad encode: at most a layer's input, its output and one temporary live at once; taken as three
    times the largest activation (fp32: the VAE runs in fp32 by default)."""
    largest = [0]

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], _nbytes(output))

    handles = [m.register_forward_hook(record) for m in vae.encoder.modules()]  # type: ignore[union-attr]
    try:
        with torch.no_grad(), _flash_style_sdpa():
            vae.encode(torch.empty(1, 3, height, width))  # type: ignore[operator]
    finally:
        for handle in handles:
            handle.remove()
    return 3 * largest[0]
