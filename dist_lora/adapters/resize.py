"""`dist-lora resize`: every module of an adapter file re-approximated at a new rank by SVD, as kohya's
networks/resize_lora.py does, with its --dynamic_method rules.

LoRA/LoCon/DoRA modules keep their scale: the product ``up @ down`` is decomposed (exactly, through the
QR factors of its rank-r form) and written back with alpha = old scale x new rank, so the change the
file makes is its best approximation at that rank. LoHa and LoKr modules are decomposed from their full
weight change (scale included) and written as LoRA with alpha = rank. A module never gets more rank
than it has. 1x1 convolutions count as linear layers (``--rank``), k x k ones take ``--conv-rank``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_lora.adapters.delta import module_delta, needs_shape, refuse_rotations, weight_shapes
from dist_lora.adapters.io import AdapterFileError, read_adapter_file
from dist_lora.adapters.kohya import SAVE_DTYPES, safetensors_hashes
from dist_lora.adapters.tensors import ModuleAdapter
from dist_lora.errors import DistLoraError
from dist_lora.utils.files import atomic_path

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_SINGULAR_VALUE = 1e-6  # kohya's MIN_SV: a module whose largest singular value is below it gets rank 1


@dataclass(frozen=True)
class ResizeRule:
    rank: int  # the rank, or with a dynamic method the most any module gets
    conv_rank: int
    dynamic: str | None = None
    dynamic_param: float | None = None

    def check(self) -> None:
        if self.rank < 1 or self.conv_rank < 1:
            raise DistLoraError(f"--rank {self.rank} / --conv-rank {self.conv_rank}: ranks are whole numbers >= 1.")
        if self.dynamic is None:
            if self.dynamic_param is not None:
                raise DistLoraError("--dynamic-param needs --dynamic sv_ratio|sv_fro|sv_cumulative.")
            return
        if self.dynamic not in DYNAMIC_METHODS:
            raise DistLoraError(f"--dynamic '{self.dynamic}' is not one of {', '.join(DYNAMIC_METHODS)}.")
        if self.dynamic_param is None:
            raise DistLoraError(f"--dynamic {self.dynamic} needs --dynamic-param (e.g. 2 for sv_ratio, 0.9 for "
                                f"sv_fro and sv_cumulative).")
        fraction = self.dynamic in ("sv_fro", "sv_cumulative")
        if fraction and not 0 < self.dynamic_param <= 1:
            raise DistLoraError(f"--dynamic-param {self.dynamic_param}: {self.dynamic} takes the fraction to keep, "
                                f"in (0, 1].")
        if not fraction and self.dynamic_param < 1:
            raise DistLoraError(f"--dynamic-param {self.dynamic_param}: sv_ratio takes the largest singular value's "
                                f"ratio to the smallest kept, >= 1.")


def chosen_rank(singular: torch.Tensor, rule: ResizeRule, max_rank: int) -> int:
    """kohya's rules on the singular values (descending): sv_ratio keeps those above S[0] / param; sv_fro the
    fewest whose squares reach param^2 of the total; sv_cumulative the fewest whose sum reaches param of it;
    capped at ``max_rank``; 1 for a zero matrix."""
    if singular.numel() == 0 or float(singular[0]) <= ZERO_SINGULAR_VALUE:
        return 1
    last = singular.numel() - 1
    if rule.dynamic is None:
        rank = max_rank
    elif rule.dynamic == "sv_ratio":
        rank = int((singular > singular[0] / rule.dynamic_param).sum())  # type: ignore[operator]
    else:
        values = singular.pow(2) if rule.dynamic == "sv_fro" else singular
        target = rule.dynamic_param**2 if rule.dynamic == "sv_fro" else rule.dynamic_param  # type: ignore[operator]
        share = torch.cumsum(values, 0) / values.sum()
        rank = min(int(torch.searchsorted(share, torch.tensor([float(target)], dtype=share.dtype))[0]), last) + 1
    return max(1, min(rank, max_rank, singular.numel()))


def _svd(adapter: ModuleAdapter, shape: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         tuple[int, ...], float]:
    """U, S, Vh of the module's change as an [out, in*k*k] matrix, its weight shape, and the scale the
    written LoRA keeps (the factors exclude it)."""
    if adapter.kind == "lora":
        down, up = adapter.tensors["lora_down.weight"].double(), adapter.tensors["lora_up.weight"].double()
        # up @ down has rank <= r: decompose the r x r core of its QR factors, exactly, not the full matrix.
        q_up, r_up = torch.linalg.qr(up.flatten(1))
        q_down, r_down = torch.linalg.qr(down.flatten(1).T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        return q_up @ u, s, vh @ q_down.T, (up.shape[0], *down.shape[1:]), adapter.scale
    delta = module_delta(adapter, shape).double()
    u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
    return u, s, vh, tuple(delta.shape), 1.0


def is_spatial(weight_shape: tuple[int, ...]) -> bool:
    """A k x k convolution (k > 1): what kohya's conv ranks apply to."""
    return len(weight_shape) == 4 and weight_shape[2] * weight_shape[3] > 1


def lora_tensors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, weight_shape: tuple[int, ...],
                 scale: float = 1.0) -> dict[str, torch.Tensor]:
    """LoRA tensors of the rank-``rank`` truncation of U diag(S) Vh (up = U S, down = Vh) that a loader
    applies at ``scale``: alpha = scale x rank."""
    up = (u[:, :rank] * s[:rank]).reshape(weight_shape[0], rank, *([1, 1] if len(weight_shape) == 4 else []))
    down = vh[:rank].reshape(rank, *weight_shape[1:])
    return {"lora_down.weight": down.float().contiguous(), "lora_up.weight": up.float().contiguous(),
            "alpha": torch.tensor(scale * rank, dtype=torch.float32)}


@dataclass(frozen=True)
class ModuleReport:
    key: str
    kind: str
    old_rank: int
    new_rank: int
    alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float

    def line(self) -> str:
        return (f"{self.key:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: {self.fro_retained:.1%}, "
                f"max(S) ratio: {self.max_ratio:0.1f}, dim: {self.old_rank} -> {self.new_rank}, alpha: {self.alpha:g}")


def resize_module(key: str, adapter: ModuleAdapter, rule: ResizeRule,
                  shape: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], ModuleReport]:
    """The module as LoRA tensors (``lora_down.weight``, ``lora_up.weight``, ``alpha``, and a DoRA
    magnitude unchanged) at the rank the rule chooses, and what was kept."""
    u, s, vh, weight_shape, scale = _svd(adapter, shape)
    rank = chosen_rank(s, rule, rule.conv_rank if is_spatial(weight_shape) else rule.rank)
    tensors = lora_tensors(u, s, vh, rank, weight_shape, scale)
    alpha = scale * rank
    if "dora_scale" in adapter.tensors:
        tensors["dora_scale"] = adapter.tensors["dora_scale"].float()
    total, squares = float(s.abs().sum()), float(s.pow(2).sum())
    kept_ratio = float(s[0] / s[rank - 1]) if float(s[rank - 1]) > 0 else math.inf
    report = ModuleReport(key, adapter.kind, adapter.rank, rank, alpha,
                          float(s[:rank].abs().sum()) / total if total else 1.0,
                          math.sqrt(float(s[:rank].pow(2).sum()) / squares) if squares else 1.0, kept_ratio)
    return tensors, report


def file_family(keys: list[str], metadata: dict[str, str]) -> str:
    if metadata.get("ss_base_model_version", "").startswith("sdxl") or \
            any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                              "lora_unet_middle_block_")) for k in keys):
        return "sdxl"
    return "sd1"


def resize_file(source: str | Path, target: str | Path, rule: ResizeRule, *, save_precision: str = "fp16",
                base: str | None = None, overwrite: bool = False) -> list[ModuleReport]:
    """Check the arguments and the file, resize every module, write ``target`` atomically."""
    rule.check()
    target = Path(target)
    if target.suffix != ".safetensors":
        raise DistLoraError(f"output '{target}' must end in .safetensors.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"output '{target}' already exists; choose another path or pass --overwrite.")
    if save_precision not in SAVE_DTYPES:
        raise DistLoraError(f"--save-precision '{save_precision}' is not one of {', '.join(SAVE_DTYPES)}.")
    adapter_file = read_adapter_file(source)
    refuse_rotations(source, adapter_file.modules, "resized")
    if Path(source).resolve() == target.resolve():
        raise DistLoraError(f"output '{target}' is the input file; write the resized file elsewhere.")
    shapes: dict[str, tuple[int, ...]] = {}
    if base is not None or any(needs_shape(k, a) for k, a in adapter_file.modules.items()):
        shapes = weight_shapes(base, file_family(list(adapter_file.modules), adapter_file.metadata))
    tensors: dict[str, torch.Tensor] = {}
    reports = []
    for key, adapter in sorted(adapter_file.modules.items()):
        if needs_shape(key, adapter) and key not in shapes:
            raise AdapterFileError(f"adapter file '{source}': module '{key}' stores a convolution's factors "
                                   f"flattened and the UNet {'in --base' if base else 'of its family'} has no such "
                                   f"module to give its shape; pass --base with the diffusers folder it was "
                                   f"trained on.")
        try:
            module_tensors, report = resize_module(key, adapter, rule, shapes.get(key))
        except DistLoraError as exc:
            hint = "" if base else " (shapes from the published UNet of its family; pass --base with the diffusers " \
                                   "folder it was trained on)"
            raise AdapterFileError(f"adapter file '{source}': module '{key}': {exc}{hint}") from exc
        tensors.update({f"{key}.{suffix}": value for suffix, value in module_tensors.items()})
        reports.append(report)
    write_lora(target, tensors, _metadata(adapter_file.metadata, adapter_file.modules, rule, reports), save_precision)
    return reports


def _metadata(old: dict[str, str], modules: dict[str, ModuleAdapter], rule: ResizeRule,
              reports: list[ModuleReport]) -> dict[str, str]:
    meta = {k: v for k, v in old.items() if not k.startswith("sshs_")}
    old_dim = max(r.old_rank for r in reports)
    comment = meta.get("ss_training_comment", "")
    lycoris = sorted({a.kind for a in modules.values()} - {"lora"})
    if lycoris:
        # The file is LoRA now: metadata naming LyCORIS' module and algorithm would describe another file.
        meta["ss_network_module"] = "networks.lora"
        meta.pop("ss_network_args", None)
        comment = f"{'/'.join(lycoris)} converted to LoRA by SVD of each module's change; {comment}"
    if rule.dynamic is None:
        conv = "" if rule.conv_rank == rule.rank else f" (conv: {rule.conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {rule.rank}{conv}; {comment}"
        meta["ss_network_dim"] = str(rule.rank)
        alphas = {r.alpha for r in reports if r.new_rank == rule.rank}
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    else:
        meta["ss_training_comment"] = f"Dynamic resize with {rule.dynamic}: {rule.dynamic_param} from {old_dim}; " \
                                      f"{comment}"
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    meta["dist_lora_resize"] = json.dumps({
        "rank": rule.rank, "conv_rank": rule.conv_rank, "dynamic": rule.dynamic, "dynamic_param": rule.dynamic_param,
        "module_ranks": {r.key: r.new_rank for r in reports}}, sort_keys=True)
    return meta


def write_lora(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], save_precision: str) -> None:
    dtype = SAVE_DTYPES[save_precision]
    cast = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    bad = [k for k, v in cast.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise DistLoraError(f"refusing to write '{target}': non-finite values in {bad[:3]} (overflow in "
                            f"{save_precision}? try --save-precision fp32).")
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(cast, metadata)
    with atomic_path(target) as tmp:
        save_file(cast, str(tmp), metadata=metadata)


def summary(reports: list[ModuleReport]) -> str:
    fro = torch.tensor([r.fro_retained for r in reports], dtype=torch.float64)
    ranks = sorted({r.new_rank for r in reports})
    return (f"resized {len(reports)} modules to rank {ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "") +
            f"; average Frobenius norm retention: {float(fro.mean()):.2%} | std: {float(fro.std(unbiased=False)):0.3f}")
