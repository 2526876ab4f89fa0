"""kohya's numbering of UNet blocks, for per-block ranks (block_dims) and learning rates (*_lr_weight).

SD 1.x/2.x has 25 blocks: IN00-IN11 (down blocks: 3 slots each, IN00 being conv_in, which gets no
adapter), MID, OUT00-OUT11. SDXL has 23: 0 (time and label embeddings), IN0-IN8 (``input_blocks``),
MID0-MID2 (``middle_block``), OUT0-OUT8 (``output_blocks``), 22 (``out``). Indices are computed on
the module's kohya name (SGM names for SDXL), as sd-scripts' ``get_block_index`` does, so a list
written for kohya means the same blocks here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dist_lora.errors import DistLoraError
from dist_lora.models.names import UNetLayout, unet_diffusers_to_ldm

SD_DOWN_UP_BLOCKS, SD_MID_BLOCKS = 12, 1
SDXL_DOWN_UP_BLOCKS, SDXL_MID_BLOCKS = 9, 3
_SD_UPDOWN = re.compile(r"^(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.")
_LR_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_count(family: str) -> int:
    if family == "sdxl":
        return 1 + 2 * SDXL_DOWN_UP_BLOCKS + SDXL_MID_BLOCKS + 1
    return 2 * SD_DOWN_UP_BLOCKS + SD_MID_BLOCKS


def block_index(module_path: str, family: str, layout: UNetLayout | None = None) -> int:
    """The kohya block of a diffusers UNet module path (-1 where kohya assigns none)."""
    if family != "sdxl":
        match = _SD_UPDOWN.match(module_path)
        if match:
            block, kind, slot = int(match[2]), match[3], int(match[4])
            index = 3 * block + (2 if kind in ("upsamplers", "downsamplers") else slot)
            return 1 + index if match[1] == "down" else SD_DOWN_UP_BLOCKS + 1 + index
        return SD_DOWN_UP_BLOCKS if module_path.startswith("mid_block.") else -1
    if layout is None:
        raise ValueError("SDXL block indices need the UNet's layout")
    try:
        name = unet_diffusers_to_ldm(module_path, layout)
    except KeyError:
        return -1
    head, _, rest = name.partition(".")
    number = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else 0
    offsets = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13, "out": 22}
    if head not in offsets:
        return -1
    return offsets[head] + (number if head in ("input_blocks", "middle_block", "output_blocks") else 0)


def _parse_numbers(text: str, key: str) -> list[float]:
    try:
        return [float(part) if part.strip() else 0.0 for part in text.split(",")]
    except ValueError as exc:
        raise DistLoraError(f"network.{key} = {text!r} is not a comma-separated list of numbers "
                            f"(e.g. '1,1,0.5') or, for down/up, one of {', '.join(_LR_CURVES)} "
                            f"with an optional '+base' (e.g. 'sine+0.5').") from exc


def _curve(text: str, length: int, key: str) -> list[float]:
    """kohya's named down/up weight curves: ``name`` or ``name+base``."""
    name, _, base_text = text.partition("+")
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError as exc:
        raise DistLoraError(f"network.{key} = {text!r}: the part after '+' must be a number.") from exc
    last = length - 1
    values = {"cosine": [math.sin(math.pi * (i / last) / 2) for i in reversed(range(length))],
              "sine": [math.sin(math.pi * (i / last) / 2) for i in range(length)],
              "linear": [i / last for i in range(length)],
              "reverse_linear": [i / last for i in reversed(range(length))],
              "zeros": [0.0] * length}[name]
    return [v + base for v in values]


def _weights(text: str, length: int, key: str, curves: bool) -> list[float]:
    """One part of kohya's lr weights: too long is cut, too short is filled with 1 (as kohya warns)."""
    if not text:
        return [1.0] * length
    named = curves and text.partition("+")[0] in _LR_CURVES
    values = _curve(text, length, key) if named else _parse_numbers(text, key)
    return (values + [1.0] * length)[:length]


@dataclass(frozen=True)
class BlockSettings:
    """Per-block rank, alpha and learning-rate weight of the UNet adapters (kohya's network_args)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None


def block_settings(family: str, *, rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                   block_dims: list[int], block_alphas: list[float], conv_block_dims: list[int],
                   conv_block_alphas: list[float], down_lr_weight: str, mid_lr_weight: str, up_lr_weight: str,
                   zero_threshold: float) -> BlockSettings | None:
    """kohya's ``get_block_dims_and_alphas`` + ``get_block_lr_weight`` + ``remove_block_dims_and_alphas``:
    None when no per-block option is set; blocks whose learning-rate weight is 0 get no adapters."""
    lr_set = bool(down_lr_weight or mid_lr_weight or up_lr_weight)
    if not (block_dims or lr_set or conv_block_dims):
        if block_alphas or conv_block_alphas:
            raise DistLoraError("network.block_alphas / conv_block_alphas need network.block_dims / conv_block_dims "
                                "(or a *_lr_weight), as in kohya.")
        return None
    total = block_count(family)
    names = "IN00-IN11, MID, OUT00-OUT11" if family != "sdxl" else "0, IN0-IN8, MID0-MID2, OUT0-OUT8, 22"
    for key, values in (("block_dims", block_dims), ("block_alphas", block_alphas),
                        ("conv_block_dims", conv_block_dims), ("conv_block_alphas", conv_block_alphas)):
        if values and len(values) != total:
            raise DistLoraError(f"network.{key} has {len(values)} values; a {family} UNet has {total} kohya blocks "
                                f"({names}): give one value per block.")
    dims = list(block_dims) or [rank] * total
    alphas = list(block_alphas) or [alpha] * total
    conv_dims: list[int] | None = list(conv_block_dims) or ([conv_rank] * total if conv_rank else None)
    conv_alphas = (list(conv_block_alphas) or [conv_alpha or alpha] * total) if conv_dims else None
    lr_weights = None
    if lr_set:
        per = SDXL_DOWN_UP_BLOCKS if family == "sdxl" else SD_DOWN_UP_BLOCKS
        mid = SDXL_MID_BLOCKS if family == "sdxl" else SD_MID_BLOCKS
        parts = (_weights(down_lr_weight, per, "down_lr_weight", True) + _weights(mid_lr_weight, mid, "mid_lr_weight",
                                                                                    False)
                 + _weights(up_lr_weight, per, "up_lr_weight", True))
        parts = [w if w > zero_threshold else 0.0 for w in parts]
        lr_weights = [1.0, *parts, 1.0] if family == "sdxl" else parts
        for i, weight in enumerate(lr_weights):
            if weight == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockSettings(dims, alphas, conv_dims, conv_alphas, lr_weights)


def block_list_text(values: list[int] | list[float]) -> str:
    """A block list as kohya's network_args spell it: ``4,4,8``."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
