"""The weight change a file's adapter makes to its module, computed from the tensors alone.

LoRA/LoCon: ``scale * up @ down``; LoHa: ``scale * (w1a @ w1b) * (w2a @ w2b)`` (with CP cores:
``einsum(t, b, a)`` per factor); LoKr: ``scale * kron(w1, w2)``, each factor whole, as ``a @ b``, or with
a CP core. ``scale`` is ``ModuleAdapter.scale`` (alpha / rank, or 1 for LoKr with two full factors), as
every loader applies it. LyCORIS stores a convolution's LoHa/LoKr factors flattened to [out, in*k*k]
where no CP core is used, so those need the module's weight shape; LoRA's tensors carry it.
OFT/BOFT rotate the base weight, so their change is a function of it (``orthogonal.weight_change``) and
not of the tensors alone: the tools that work from the file alone refuse them (``refuse_rotations``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dist_lora.adapters.tensors import ModuleAdapter
from dist_lora.errors import DistLoraError


def _cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A CP-decomposed factor: core [r, r, k, k] with a [r, out] and b [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a, b)


def _lokr_factor(t: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    whole = t.get(f"lokr_w{n}")
    if whole is not None:
        return whole.float()
    a, b = t[f"lokr_w{n}_a"].float(), t[f"lokr_w{n}_b"].float()
    core = t.get(f"lokr_t{n}")
    return _cp(core.float(), a, b) if core is not None else a @ b


def module_delta(adapter: ModuleAdapter, shape: Sequence[int] | None = None) -> torch.Tensor:
    """The module's weight change in fp32, scale included, shaped like its weight. ``shape`` (the
    module's weight shape) is needed only for flattened convolution factors; a mismatch is an error."""
    t = adapter.tensors
    if adapter.rotates:
        raise DistLoraError(f"an {adapter.kind.upper()} module rotates the base weight: its change depends on that "
                            f"weight and is not a product of the file's tensors")
    if adapter.kind == "lora":
        down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    elif adapter.kind == "loha":
        if "hada_t1" in t:
            w1 = _cp(t["hada_t1"].float(), t["hada_w1_a"].float(), t["hada_w1_b"].float())
            w2 = _cp(t["hada_t2"].float(), t["hada_w2_a"].float(), t["hada_w2_b"].float())
        else:
            w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
            w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
        delta = w1 * w2
    else:
        w1, w2 = _lokr_factor(t, 1), _lokr_factor(t, 2)
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        delta = torch.kron(w1, w2)
    delta = delta * adapter.scale
    if shape is not None and tuple(delta.shape) != tuple(shape):
        if delta.numel() != int(torch.Size(shape).numel()):
            raise DistLoraError(f"its tensors make a {tuple(delta.shape)} change; the module's weight is "
                                f"{tuple(shape)}")
        delta = delta.reshape(tuple(shape))
    return delta


def needs_shape(key: str, adapter: ModuleAdapter) -> bool:
    """Whether the tensors leave the module's weight shape open: a UNet module's LoHa/LoKr factors may be a
    convolution's, flattened (text encoders have linear layers only)."""
    if adapter.kind == "lora" or adapter.rotates:
        return False
    return key.startswith("lora_unet_") and module_delta(adapter).dim() == 2


def refuse_rotations(path: object, modules: dict[str, ModuleAdapter], action: str) -> None:
    """Refuse an OFT/BOFT file for a tool that works from the file's tensors alone (resize, merge into a LoRA)."""
    rotating = sorted(k for k, a in modules.items() if a.rotates)
    if rotating:
        kind = modules[rotating[0]].kind.upper()
        raise DistLoraError(f"adapter file '{path}' is {kind} (module '{rotating[0]}' has oft_blocks): it rotates "
                            f"the base model's weights, so its change depends on them and is no low-rank product; "
                            f"it cannot be {action}. Bake it into the model with dist-lora merge instead.")


def weight_shapes(config_folder: str | Path | None, family: str) -> dict[str, tuple[int, ...]]:
    """kohya module key -> weight shape, for a UNet built on the meta device from ``config_folder``'s
    unet/config.json, or from the published architecture of ``family`` (sd1/sd2 or sdxl)."""
    import json

    from diffusers import UNet2DConditionModel

    from dist_lora.adapters.kohya import module_key_table
    from dist_lora.models.reference import FULL_SIZE

    if config_folder is not None:
        path = Path(config_folder) / "unet" / "config.json"
        if not path.is_file():
            raise DistLoraError(f"--base '{config_folder}' is not a diffusers folder with unet/config.json.")
        config = json.loads(path.read_text())
    else:
        config = FULL_SIZE["sdxl" if family == "sdxl" else "sd15"]["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    modules = dict(unet.named_modules())
    return {key: tuple(modules[path].weight.shape)
            for key, (_, path) in module_key_table(unet, [], family).items()}
