"""`dist-lora inspect`: what an adapter file holds, without loading a model."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from dist_lora.adapters.io import read_adapter_file
from dist_lora.adapters.tensors import ModuleAdapter

_BLOCKS = [("down", re.compile(r"^lora_unet_(down_blocks|input_blocks)_")),
           ("mid", re.compile(r"^lora_unet_(mid_block|middle_block)_")),
           ("up", re.compile(r"^lora_unet_(up_blocks|output_blocks)_"))]


def _network_type(adapters: list[ModuleAdapter]) -> str:
    kinds = {a.kind for a in adapters}
    if kinds == {"lora"}:
        if any(a.is_dora for a in adapters):
            return "dora"
        spatial = any(a.tensors["lora_down.weight"].ndim == 4 and a.tensors["lora_down.weight"].shape[-1] > 1
                      for a in adapters)
        return "locon" if spatial else "lora"
    return "+".join(sorted(kinds))


def _rank_alpha(adapters: list[ModuleAdapter]) -> dict[str, Any]:
    pairs = Counter((a.rank, a.alpha) for a in adapters)
    (rank, alpha), _ = pairs.most_common(1)[0]
    return {"rank": rank, "alpha": alpha, "all": sorted(f"{r}/{al:g}" for r, al in pairs)}


def _base_model(keys: list[str], metadata: dict[str, str]) -> str:
    if "ss_base_model_version" in metadata:
        return metadata["ss_base_model_version"]
    if any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_")) for k in keys):
        return "sdxl (from key names)"
    return "sd_v1 or sd_v2 (from key names)"


def describe_adapter(path: str | Path) -> dict[str, Any]:
    adapter_file = read_adapter_file(path)
    modules = adapter_file.modules
    components = Counter(k.split("_")[1] for k in modules)  # unet, te, te1, te2
    blocks = {}
    for block, pattern in _BLOCKS:
        selected = [a for k, a in modules.items() if pattern.match(k)]
        if selected:
            blocks[block] = {"modules": len(selected), **_rank_alpha(selected)}
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for a in modules.values() for t in a.tensors.values())
    return {
        "file": str(adapter_file.path),
        "size_bytes": adapter_file.path.stat().st_size,
        "type": _network_type(list(modules.values())),
        "modules": dict(components),
        **_rank_alpha(list(modules.values())),
        "blocks": blocks,
        "base_model": _base_model(list(modules), adapter_file.metadata),
        "precision": dict(dtypes),
        "metadata": {k: v for k, v in sorted(adapter_file.metadata.items()) if k != "ss_tag_frequency"},
    }


def format_description(info: dict[str, Any]) -> str:
    lines = [f"{info['file']} ({info['size_bytes'] / 1e6:.2f} MB)",
             f"  type:        {info['type']}",
             f"  base model:  {info['base_model']}",
             f"  rank/alpha:  {info['rank']}/{info['alpha']:g}  (all: {', '.join(info['all'])})",
             f"  modules:     {', '.join(f'{k}: {v}' for k, v in info['modules'].items())}",
             f"  precision:   {', '.join(f'{k}: {v}' for k, v in info['precision'].items())}"]
    for block, b in info["blocks"].items():
        lines.append(f"  unet {block:<4}:  {b['modules']} modules, rank/alpha {b['rank']}/{b['alpha']:g}")
    for key in ("ss_network_module", "ss_network_args", "ss_output_name", "ss_steps", "sshs_model_hash"):
        if key in info["metadata"]:
            lines.append(f"  {key}: {info['metadata'][key]}")
    return "\n".join(lines)
