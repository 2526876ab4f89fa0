"""`dist-lora extract`: a LoRA that approximates a fine-tune's change to its base model, by SVD per module
(kohya's networks/extract_lora_from_models.py).

The modules are those a LoRA of ``--preset`` trains (kohya's: every linear of the transformer blocks and
SD 1.x's 1x1 proj convs; with ``--conv-rank`` LoCon's resnet and sampler convs too) and the text
encoders' attention and MLP linears. The text encoders are left out when no weight of theirs differs by
more than ``--min-diff`` (kohya's rule: a UNet-only fine-tune). Each change ``tuned - base`` is
decomposed in fp32 and truncated at ``--rank`` (``--conv-rank`` for k x k convolutions); up = U S,
down = Vh, alpha = rank; ``--clamp-quantile`` clamps the factors' values as kohya does (default 0.99).
A module the fine-tune did not change at all is not written.

Memory: the models load one after another in the precision they are stored in; between them only the
base's target weights are kept, and each module's change exists in fp32 only while it is decomposed.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dist_lora.adapters.kohya import (
    BASE_MODEL_VERSION,
    MODELSPEC_ARCHITECTURE,
    SAVE_DTYPES,
    model_version_key,
    module_key_table,
)
from dist_lora.adapters.resize import is_spatial, lora_tensors, write_lora
from dist_lora.adapters.targets import text_encoder_targets, unet_targets
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.load import ModelSource, inspect_model_source, load_components

LOAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExtractOptions:
    rank: int
    conv_rank: int = 0
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    preset: str = "attn_ff"
    config_dir: str = ""
    load_precision: str = "auto"  # auto: the precision the base's UNet is stored in
    save_precision: str = "fp16"
    overwrite: bool = False

    def check(self) -> None:
        if self.rank < 1 or self.conv_rank < 0:
            raise DistLoraError(f"--rank {self.rank} / --conv-rank {self.conv_rank}: --rank is a whole number >= 1, "
                                f"--conv-rank >= 1 to extract k x k convolutions too (0: not).")
        if not 0.5 < self.clamp_quantile <= 1.0:
            raise DistLoraError(f"--clamp-quantile {self.clamp_quantile}: give a quantile in (0.5, 1] (kohya's "
                                f"default 0.99; 1 clamps nothing).")
        if self.min_diff < 0:
            raise DistLoraError(f"--min-diff {self.min_diff} must be >= 0.")
        if self.load_precision != "auto" and self.load_precision not in LOAD_DTYPES:
            raise DistLoraError(f"--load-precision '{self.load_precision}' is not auto or one of "
                                f"{', '.join(LOAD_DTYPES)}.")
        if self.save_precision not in SAVE_DTYPES:
            raise DistLoraError(f"--save-precision '{self.save_precision}' is not one of {', '.join(SAVE_DTYPES)}.")


@dataclass(frozen=True)
class ExtractReport:
    modules: int
    unchanged: int
    text_encoders: bool  # whether they were extracted
    largest_text_diff: float


def stored_dtype(source: ModelSource) -> torch.dtype:
    """The dtype of the first UNet tensor in the checkpoint, read from the safetensors header."""
    path = Path(source.location)
    if source.kind == "folder":
        files = sorted((path / "unet").glob("*.safetensors"))
        if not files:
            raise DistLoraError(f"model folder '{path}' has no unet/*.safetensors.")
        path, prefix = files[0], ""
    else:
        prefix = "model.diffusion_model."
    with safe_open(str(path), framework="pt") as handle:
        key = next((k for k in handle.keys() if k.startswith(prefix)), None)  # noqa: SIM118
        if key is None:
            raise DistLoraError(f"'{path}' holds no UNet weights (no key starting '{prefix}').")
        stored = handle.get_slice(key).get_dtype()
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)


def _targets(unet: nn.Module, encoders: list[nn.Module], family: str, options: ExtractOptions
             ) -> dict[str, nn.Module]:
    """kohya module key -> module, for every module a LoRA of the options would train."""
    preset = "full" if options.conv_rank else options.preset
    cfg = NetworkConfig(rank=options.rank, alpha=float(options.rank), conv_rank=options.conv_rank, preset=preset)
    inverse = {v: k for k, v in module_key_table(unet, list(encoders), family).items()}
    modules = {name: m for name, m in unet.named_modules()}
    chosen = {inverse[(0, name)]: modules[name] for name in unet_targets(unet, cfg, family).modules
              if (0, name) in inverse}
    for index, encoder in enumerate(encoders, 1):
        named = dict(encoder.named_modules())
        for name in text_encoder_targets(encoder, cfg).modules:
            chosen[inverse[(index, name)]] = named[name]
    return chosen


def _load(source: str, options: ExtractOptions, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    return load_components(source, config_dir=options.config_dir, load_vae=False, dtype=dtype)


def extract_lora(base: str, tuned: str, target: str | Path, options: ExtractOptions) -> ExtractReport:
    """Check everything first (options, both models, their families, the output), then extract and write."""
    options.check()
    target = Path(target)
    if target.suffix != ".safetensors":
        raise DistLoraError(f"--out '{target}' must end in .safetensors.")
    if target.exists() and not options.overwrite:
        raise FileExistsError(f"output '{target}' already exists; choose another path or pass --overwrite.")
    base_source = inspect_model_source(base, options.config_dir)
    tuned_source = inspect_model_source(tuned, options.config_dir)
    if base_source.kind == "hub" or tuned_source.kind == "hub":
        raise DistLoraError("--base and --tuned must be local diffusers folders or .safetensors checkpoints.")
    if base_source.family and tuned_source.family and base_source.family != tuned_source.family:
        raise DistLoraError(f"--base '{base}' is {base_source.family} and --tuned '{tuned}' is "
                            f"{tuned_source.family}: a LoRA is extracted between models of one architecture.")
    dtype = LOAD_DTYPES[options.load_precision] if options.load_precision != "auto" else stored_dtype(base_source)

    c = _load(base, options, dtype)
    family, prediction = c.family, c.prediction_type
    base_weights = {key: m.weight.detach().clone() for key, m in _targets(c.unet, c.text_encoders, family,
                                                                           options).items()}
    del c
    gc.collect()
    c = _load(tuned, options, dtype)
    tuned_modules = _targets(c.unet, c.text_encoders, family, options)
    missing = sorted(set(base_weights) ^ set(tuned_modules))
    if missing:
        raise DistLoraError(f"--base and --tuned differ in their modules (e.g. '{missing[0]}'): they are not the "
                            f"same architecture.")
    text_keys = [k for k in base_weights if k.startswith("lora_te")]
    largest_text_diff = max((float((tuned_modules[k].weight.detach().float() - base_weights[k].float()).abs().max())
                             for k in text_keys), default=0.0)
    with_text = largest_text_diff > options.min_diff
    tensors: dict[str, torch.Tensor] = {}
    unchanged = 0
    for key in sorted(base_weights):
        if key.startswith("lora_te") and not with_text:
            continue
        diff = tuned_modules[key].weight.detach().float() - base_weights.pop(key).float()
        if not bool(diff.any()):
            unchanged += 1
            continue
        tensors.update({f"{key}.{s}": t for s, t in _decompose(diff, options).items()})
    del c
    gc.collect()
    if not tensors:
        raise DistLoraError(f"--tuned '{tuned}' equals --base '{base}' in every module extracted: nothing to write.")
    write_lora(target, tensors, _metadata(family, prediction, options, target), options.save_precision)
    return ExtractReport(len({k.split(".")[0] for k in tensors}), unchanged, with_text, largest_text_diff)


def _decompose(diff: torch.Tensor, options: ExtractOptions) -> dict[str, torch.Tensor]:
    shape = tuple(diff.shape)
    u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
    rank = min(options.conv_rank if is_spatial(shape) else options.rank, s.numel())
    tensors = lora_tensors(u, s, vh, rank, shape)
    if options.clamp_quantile < 1.0:
        values = torch.cat([tensors["lora_up.weight"].flatten(), tensors["lora_down.weight"].flatten()])
        high = float(torch.quantile(values, options.clamp_quantile))
        for name in ("lora_up.weight", "lora_down.weight"):
            tensors[name] = tensors[name].clamp(-high, high)
    return tensors


def _metadata(family: str, prediction: str, options: ExtractOptions, target: Path) -> dict[str, str]:
    version = model_version_key(family, prediction)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(options.rank),
            "ss_network_alpha": str(float(options.rank)), "ss_base_model_version": BASE_MODEL_VERSION[version],
            "ss_v2": str(family == "sd2"), "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE[version], "modelspec.title": target.stem,
            "ss_training_comment": f"extracted by dist-lora extract (clamp quantile {options.clamp_quantile}, "
                                   f"min diff {options.min_diff})"}
    if options.conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(options.conv_rank),
                                              "conv_alpha": str(float(options.conv_rank))})
    return meta
