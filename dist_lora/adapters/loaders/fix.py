"""`dist-lora verify FILE --fix OUT`: the same adapter in the kohya layout every loader reads.

Only names change, and tensors move between spellings that mean the same: ``lora_A``/``lora_B`` become
``lora_down``/``lora_up``; peft's per-row DoRA magnitude (``[out]``; ``[1, out, 1, 1]`` for a Conv2d)
becomes ``dora_scale`` ``[out, 1, ...]``; the scale peft keeps in its config (``lora_alpha``,
``alpha_pattern``, rsLoRA) becomes each module's alpha (scale * rank); a module without any alpha gets
alpha = rank, the scale 1 every loader applies then. Module names are those of our own export (SGM names
for SDXL's UNet, ``lora_te1_``/``lora_te2_`` for SDXL's text encoders). Every tensor keeps its values and
precision, but one: a k x k convolution's LoKr factor stored as a product of two that lycoris-lora cannot
split back is written as that product, in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_lora.adapters.kohya import BASE_MODEL_VERSION, safetensors_hashes
from dist_lora.adapters.loaders.layouts import (
    FileModule,
    ParsedFile,
    is_split_lokr_conv,
    load_tensors,
    parse_adapter_file,
)
from dist_lora.adapters.loaders.names import COMPONENTS, FamilyNames
from dist_lora.errors import DistLoraError
from dist_lora.utils.files import atomic_path

_PEFT_LAYOUTS = ("diffusers/peft", "peft save_pretrained")


@dataclass
class FixResult:
    modules: int
    renamed: int  # modules whose key changed
    alphas_added: int
    alphas_from_peft: int
    dora_reshaped: int
    lokr_rewritten: int  # LoKr convolutions whose second factor was written whole


def _rank(parts: dict[str, torch.Tensor]) -> int:
    for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return 0


def _peft_scale(parsed: ParsedFile, module: FileModule, rank: int) -> float | None:
    """The scale peft's config in the file gives this module (None without a config for its model)."""
    from peft.utils.other import get_pattern_key

    config = parsed.peft_config
    assert module.target is not None
    prefix = COMPONENTS[module.target[0]]
    if f"{prefix}.lora_alpha" not in config:
        return None
    path = module.spelled.removeprefix("base_model.model.").removeprefix(f"{prefix}.")
    alphas = dict(config.get(f"{prefix}.alpha_pattern") or {})  # type: ignore[call-overload]
    alpha = float(alphas.get(get_pattern_key(list(alphas), path), config[f"{prefix}.lora_alpha"]))
    rslora = bool(config.get(f"{prefix}.use_rslora"))
    return alpha / (math.sqrt(rank) if rslora else rank)


def _dora_scale(magnitude: torch.Tensor, weight_shape: tuple[int, ...], key: str) -> torch.Tensor:
    """peft's per-output-row magnitude ([out] for a Linear, [1, out, 1, 1] for a Conv2d) as LyCORIS stores
    it: [out, 1] or [out, 1, 1, 1]."""
    if magnitude.numel() != weight_shape[0]:
        raise DistLoraError(f"--fix: '{key}' holds {magnitude.numel()} DoRA magnitudes; the module has "
                            f"{weight_shape[0]} output rows. Nothing was written.")
    return magnitude.reshape(magnitude.numel(), *([1] * (len(weight_shape) - 1)))


def _whole_second_factor(parts: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> None:
    """Write that factor whole, [b, d, k, k] (what our export writes), in fp32: every loader computes the same
    kron(w1, w2) from it. With the first factor whole too the module has no rank left, and loaders then apply
    scale 1: alpha / rank is folded into w1."""
    down = parts.pop("lokr_w2_b").float()
    w2 = parts.pop("lokr_w2_a").float() @ down
    parts["lokr_w2"] = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
    if "lokr_w1" in parts:
        rank = int(down.shape[0])
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
        parts["lokr_w1"] = parts["lokr_w1"].float() * (alpha / rank)
        parts["alpha"] = torch.tensor(float(rank), dtype=torch.float32)


def _kohya_keys(names: FamilyNames) -> dict[tuple[int, str], str]:
    return {target: key for key, target in names.kohya.items()}


def _check_placeable(parsed: ParsedFile) -> None:
    unplaced = sorted(parsed.unknown) + sorted(k for m in parsed.modules.values() if m.target is None
                                               for k in m.tensor_keys())
    if unplaced:
        raise DistLoraError(f"--fix: {len(unplaced)} keys of '{parsed.path}' name no module of an {parsed.family} "
                            f"model, e.g. {unplaced[:3]}; nothing was written (another --family?).")


def fixed_tensors(parsed: ParsedFile) -> tuple[dict[str, torch.Tensor], FixResult]:
    _check_placeable(parsed)
    names = parsed.names
    keys = _kohya_keys(names)
    tensors = load_tensors(parsed)
    out: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    result = FixResult(len(parsed.modules), 0, 0, 0, 0, 0)
    for module in parsed.modules.values():
        assert module.target is not None
        kohya_key = keys[module.target]
        if kohya_key in written:
            raise DistLoraError(f"--fix: '{parsed.path}' holds two adapters for {kohya_key} (spelled "
                                f"'{module.spelled}' and another way); nothing was written.")
        written.add(kohya_key)
        result.renamed += kohya_key != module.spelled
        parts = {part: tensors[key] for part, key in module.parts.items()}
        if "dora_scale" in parts and module.layout in _PEFT_LAYOUTS:
            parts["dora_scale"] = _dora_scale(parts["dora_scale"], names.modules[module.target].shape,
                                              module.parts["dora_scale"])
            result.dora_reshaped += 1
        if module.target[0] == 0 and is_split_lokr_conv(parts, names.modules[module.target].shape):
            _whole_second_factor(parts, names.modules[module.target].shape)
            result.lokr_rewritten += 1
        rank = _rank(parts)
        if "alpha" not in parts and rank:
            scale = _peft_scale(parsed, module, rank) if module.layout in _PEFT_LAYOUTS else None
            if scale is None:
                result.alphas_added += 1
                scale = 1.0
            else:
                result.alphas_from_peft += 1
            parts["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        for part, tensor in parts.items():
            out[f"{kohya_key}.{part}"] = tensor.contiguous()
    return out, result


def _metadata(parsed: ParsedFile, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    metadata = {k: v for k, v in parsed.metadata.items() if k not in ("lora_adapter_metadata", "format")}
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": BASE_MODEL_VERSION["sdxl"]}[parsed.family]
    metadata.setdefault("ss_base_model_version", version)
    metadata.setdefault("ss_v2", str(parsed.family == "sd2"))
    if not any(part in k for k in tensors for part in ("hada_", "lokr_")):
        metadata.setdefault("ss_network_module", "networks.lora")
    if "sshs_model_hash" in metadata:  # the hashes cover the tensors under their keys: recompute them
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    return metadata


def fix_file(source: str | Path, out: str | Path, family: str | None = None, base: str | None = None,
             overwrite: bool = False) -> FixResult:
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise DistLoraError(f"--fix '{out}' is the file being verified; write the fixed file elsewhere.")
    if out.exists() and not overwrite:
        raise DistLoraError(f"--fix '{out}' exists; pass --overwrite to replace it.")
    parsed = parse_adapter_file(source, family, base)
    tensors, result = fixed_tensors(parsed)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=_metadata(parsed, tensors))
    return result
