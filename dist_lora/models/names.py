"""Module names: diffusers <-> original LDM/SGM (the names A1111, ComfyUI and kohya use for SDXL).

The mapping is computed from the UNet's own config (layers per block, which blocks have attention),
so it holds for the real models and for the tiny test models alike. Keys are never parsed back by
splitting on ``_``: callers build lookup tables from ``named_modules()``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs to know about a UNet."""

    layers_per_block: int
    up_block_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> UNetLayout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ValueError("per-block layers_per_block lists are not supported by the LDM name mapping")
        up_types = config["up_block_types"]
        assert isinstance(up_types, Sequence)
        return cls(layers, tuple("CrossAttn" in str(t) for t in up_types))


def _map_resnet_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _RESNET_INNER.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


def unet_diffusers_to_ldm(name: str, layout: UNetLayout) -> str:
    """Map a diffusers UNet module or parameter name to its LDM/SGM spelling.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (with two layers per block).
    Raises ``KeyError`` for names outside the UNet.
    """
    per = layout.layers_per_block
    for prefix, target in _UNET_TOP_LEVEL.items():
        if name == prefix or name.startswith(prefix + "."):
            return target + name[len(prefix):]

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", name)
    if m:
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":
            base = f"input_blocks.{1 + block * (per + 1) + per}.0"
            rest = "op" + rest[len("conv"):] if rest.startswith("conv") else rest
        elif kind == "resnets":
            base = f"input_blocks.{1 + block * (per + 1) + idx}.0"
            rest = _map_resnet_inner(rest) if rest else rest
        else:
            base = f"input_blocks.{1 + block * (per + 1) + idx}.1"
        return f"{base}.{rest}" if rest else base

    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if m:
        kind, idx, rest = m[1], int(m[2]), m[3] or ""
        if kind == "resnets":
            base = f"middle_block.{2 * idx}"
            rest = _map_resnet_inner(rest) if rest else rest
        else:
            base = f"middle_block.{2 * idx + 1}"
        return f"{base}.{rest}" if rest else base

    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", name)
    if m:
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "upsamplers":
            slot = 2 if layout.up_block_has_attention[block] else 1
            base = f"output_blocks.{block * (per + 1) + per}.{slot}"
        elif kind == "resnets":
            base = f"output_blocks.{block * (per + 1) + idx}.0"
            rest = _map_resnet_inner(rest) if rest else rest
        else:
            base = f"output_blocks.{block * (per + 1) + idx}.1"
        return f"{base}.{rest}" if rest else base

    raise KeyError(f"'{name}' is not a UNet module name known to the LDM mapping")


def kohya_module_key(prefix: str, module_path: str) -> str:
    """``lora_unet`` + ``a.b.c`` -> ``lora_unet_a_b_c``: the module part of a kohya key has no dots."""
    return f"{prefix}_{module_path.replace('.', '_')}"
