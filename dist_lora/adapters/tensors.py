"""Adapter tensors in the LyCORIS/kohya layout, read from and written to peft layers.

One ``ModuleAdapter`` per adapted module: the file-format tensors (``lora_down.weight``,
``hada_w1_a``, ``lokr_w1``, ``dora_scale``, ``oft_blocks``, ...) and the alpha a loader will read. The scale
every loader applies is ``alpha / dim`` (dim: the rank found in the tensors), except LoKr with two full
factors, which loaders apply at scale 1; there peft's alpha/r is folded into ``lokr_w1`` so the file
means exactly what was trained.

OFT/BOFT have no scale; their alpha is a constraint on ``||Q||``, read differently by the loaders
(LyCORIS, kohya and AUTOMATIC1111: ``alpha x out_dim``; ComfyUI: ``alpha``). So the blocks are written
with the training constraint already applied, and alpha (one for the file) as a bound none of them reaches:
every loader then rotates exactly as the trained layer did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from torch import nn

from dist_lora.adapters.dora_axis import is_input_axis
from dist_lora.adapters.inject import ADAPTER_NAME, ORTHOGONAL_TYPES, adapter_layers
from dist_lora.adapters.oft_layer import OrthogonalLayer, out_channels
from dist_lora.errors import DistLoraError

LORA_KEYS = ("lora_down.weight", "lora_up.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OFT_KEYS = ("oft_blocks",)
KNOWN_SUFFIXES = (*LORA_KEYS, *LOHA_KEYS, *LOKR_KEYS, *OFT_KEYS, "alpha", "dora_scale")


@dataclass
class ModuleAdapter:
    kind: str  # "lora" (incl. LoCon and DoRA), "loha", "lokr", "oft" or "boft"
    tensors: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.rotates:
            return int(t["oft_blocks"].shape[-1])  # the block size (LyCORIS' dim)
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in t:
                return int(t[key].shape[0])
        return 0  # LoKr with two full factors has no rank

    @property
    def rotates(self) -> bool:
        """OFT/BOFT: a rotation of the base weight, whose change depends on that weight."""
        return self.kind in ORTHOGONAL_TYPES

    @property
    def scale(self) -> float:
        """The factor every loader multiplies the product of the tensors by."""
        if self.rotates:
            return 1.0
        return 1.0 if self.kind == "lokr" and self.rank == 0 else self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors


def kind_of(tensors: dict[str, torch.Tensor]) -> str:
    if "lora_down.weight" in tensors:
        return "lora"
    if "hada_w1_a" in tensors:
        return "loha"
    if "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        return "lokr"
    if "oft_blocks" in tensors and tensors["oft_blocks"].dim() in (3, 4):
        return "oft" if tensors["oft_blocks"].dim() == 3 else "boft"
    raise DistLoraError(f"unknown adapter tensors {sorted(tensors)[:4]}")


def _dora_scale(layer: LoraLayer) -> torch.Tensor:
    magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach()
    # A per-output-row magnitude is stored [out, 1, ...] (LyCORIS, ComfyUI), a per-input-column one
    # [1, in, ...] (AUTOMATIC1111, ComfyUI, LyCORIS' wd_on_output=False). The base weight itself is not
    # read: under ZeRO-3 it is a shard.
    weight_dims = 4 if isinstance(layer.get_base_layer(), torch.nn.Conv2d) else 2
    if is_input_axis(layer, ADAPTER_NAME):
        return magnitude.reshape(1, magnitude.numel(), *([1] * (weight_dims - 2)))
    return magnitude.reshape(magnitude.numel(), *([1] * (weight_dims - 1)))


def is_input_axis_scale(dora_scale: torch.Tensor) -> bool:
    """A file's ``dora_scale`` holds one magnitude per input column ([1, in, ...]), not per output row."""
    return dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.shape[1] > 1


def unreached_bound(norm: float) -> float:
    """An alpha that no loader's constraint reaches for a ``Q`` of this norm (after rounding to fp16/bf16
    too): 1 where that suffices, else the norm rounded up with a margin."""
    bound = norm * 1.01 + 1e-6
    return 1.0 if bound <= 1.0 else math.ceil(bound * 100) / 100


def share_rotation_bound(adapters: Iterable[ModuleAdapter]) -> None:
    """Give every OFT/BOFT module of a file the largest of their unreached bounds: one alpha for the file, as
    LyCORIS writes its constraint, and still reached by none of them."""
    rotating = [a for a in adapters if a.rotates]
    if rotating:
        bound = max(a.alpha for a in rotating)
        for adapter in rotating:
            adapter.alpha = bound


def _read_orthogonal(layer: OrthogonalLayer) -> ModuleAdapter:
    blocks = layer.effective_blocks(ADAPTER_NAME)
    norm = float(torch.linalg.vector_norm(blocks.float() - blocks.float().transpose(-1, -2)))
    kind = "boft" if blocks.dim() == 4 else "oft"
    return ModuleAdapter(kind, {"oft_blocks": blocks}, unreached_bound(norm))


def _read_layer(layer: nn.Module) -> ModuleAdapter:
    a = ADAPTER_NAME
    if isinstance(layer, OrthogonalLayer):
        return _read_orthogonal(layer)
    if isinstance(layer, LoraLayer):
        tensors = {"lora_down.weight": layer.lora_A[a].weight.detach(),
                   "lora_up.weight": layer.lora_B[a].weight.detach()}
        if not layer.use_dora.get(a):
            return ModuleAdapter("lora", tensors, float(layer.lora_alpha[a]))
        tensors["dora_scale"] = _dora_scale(layer)
        if is_input_axis(layer, a):
            # AUTOMATIC1111 normalises W + up @ down and scales the result by alpha/dim afterwards, so the
            # scale is folded into up and alpha written as the rank: every loader then normalises W + s B A.
            tensors["lora_up.weight"] = tensors["lora_up.weight"] * float(layer.scaling[a])
            return ModuleAdapter("lora", tensors, float(tensors["lora_down.weight"].shape[0]))
        return ModuleAdapter("lora", tensors, float(layer.lora_alpha[a]))
    if isinstance(layer, LoHaLayer):
        tensors = {k: getattr(layer, k)[a].detach() for k in LOHA_KEYS if a in getattr(layer, k)}
        return ModuleAdapter("loha", tensors, float(layer.alpha[a]))
    if isinstance(layer, LoKrLayer):
        tensors = {k: getattr(layer, k)[a].detach() for k in LOKR_KEYS if a in getattr(layer, k)}
        base = layer.get_base_layer()
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1) and "lokr_w2_a" in tensors \
                and "lokr_t2" not in tensors:
            # A k x k convolution's second factor as [b, r] @ [r, d*k*k]: LyCORIS (4.1) infers the factor
            # split when rebuilding a network from a file, reading d*k*k as the input split, and gets it
            # wrong where the input and output dimensions split differently (SD 1.5's 1920 -> 640 conv1:
            # 40 x 48 in, 20 x 32 out), refusing the whole file. The same factor written whole as
            # [b, d, k, k] is unambiguous; every loader computes the same kron(w1, w2) from it.
            w2 = tensors.pop("lokr_w2_a") @ tensors.pop("lokr_w2_b")
            tensors["lokr_w2"] = w2.reshape(w2.shape[0], -1, *base.kernel_size)
        if "lokr_w1_a" in tensors and "lokr_w2" in tensors:
            # peft can decompose only the first factor; LyCORIS and A1111 cannot load that layout
            # (they decompose the second factor first), so write the first factor whole.
            tensors["lokr_w1"] = tensors.pop("lokr_w1_a") @ tensors.pop("lokr_w1_b")
        adapter = ModuleAdapter("lokr", tensors, float(layer.alpha[a]))
        if adapter.rank == 0:  # both factors full: loaders use scale 1, peft used alpha/r
            tensors["lokr_w1"] = tensors["lokr_w1"] * float(layer.scaling[a])
            adapter.alpha = float(layer.r[a])
        return adapter
    raise TypeError(f"not an adapter layer: {type(layer).__name__}")


def read_adapters(model: nn.Module) -> dict[str, ModuleAdapter]:
    """Module path -> its adapter, for every adapted module of ``model``."""
    return {name: _read_layer(layer) for name, layer in adapter_layers(model)}


def _set_param(store: nn.ParameterDict, value: torch.Tensor) -> None:
    store[ADAPTER_NAME] = nn.Parameter(value.detach().clone().float())


def write_adapter(layer: nn.Module, adapter: ModuleAdapter) -> None:
    """Overwrite an injected peft layer's adapter with ``adapter`` (shapes may differ from the injection)."""
    a, t = ADAPTER_NAME, adapter.tensors
    with torch.no_grad():
        if isinstance(layer, OrthogonalLayer):
            # A file's alpha is the constraint as LyCORIS, kohya and AUTOMATIC1111 read it (x out_dim).
            layer.set_blocks(a, t["oft_blocks"], adapter.alpha * out_channels(layer.get_base_layer()))
            return
        if isinstance(layer, LoraLayer):
            layer.lora_A[a].weight.copy_(t["lora_down.weight"])
            layer.lora_B[a].weight.copy_(t["lora_up.weight"])
            if adapter.is_dora:
                if is_input_axis_scale(t["dora_scale"]) != is_input_axis(layer, a):
                    raise DistLoraError("a DoRA magnitude's axis differs from the layer's it is written to")
                magnitude = layer.lora_magnitude_vector[a].weight
                magnitude.copy_(t["dora_scale"].reshape(magnitude.shape))
            layer.lora_alpha[a], layer.r[a] = adapter.alpha, adapter.rank
            layer.scaling[a] = adapter.scale
            return
        keys = LOHA_KEYS if isinstance(layer, LoHaLayer) else LOKR_KEYS
        for key in keys:
            store = getattr(layer, key)
            if key in t:
                _set_param(store, t[key])
            elif a in store:
                del store[a]
        if adapter.rank:
            layer.r[a], layer.alpha[a] = adapter.rank, adapter.alpha
        else:
            # LoKr with two full factors: loaders apply scale 1, and the file's alpha (conventionally the
            # rank it was trained with) is only carried along. alpha == r makes peft's alpha/r agree.
            layer.r[a] = max(1, round(adapter.alpha))
            layer.alpha[a] = float(layer.r[a])
        layer.scaling[a] = adapter.scale
