"""Attach the configured network (or one read from a file) to a base model's UNet and text encoders."""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from dist_lora.adapters.blocks import block_index, block_list_text
from dist_lora.adapters.inject import (
    ADAPTER_NAME,
    ORTHOGONAL_TYPES,
    adapter_layers,
    add_network,
    bound_rotations,
    check_plan,
)
from dist_lora.adapters.targets import resolve_preset, text_encoder_targets, unet_block_settings, unet_targets
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.names import UNetLayout


@dataclass
class AttachedNetwork:
    trained_text_encoders: list[nn.Module]
    unet_modules: int
    text_encoder_modules: int


def selected_text_encoders(encoders: list[nn.Module], cfg: NetworkConfig) -> list[nn.Module]:
    if not cfg.train_text_encoder:
        return []
    if cfg.text_encoders == "all" or len(encoders) == 1:
        return list(encoders)
    return [encoders[0]] if cfg.text_encoders == "te1" else [encoders[1]]


def resolve_dora_axis(cfg: NetworkConfig, file_format: str) -> str:
    """The DoRA magnitude's axis: "input" for kohya-format files unless asked otherwise; the diffusers
    layout (read by peft) has only the per-row kind."""
    axis = cfg.dora_axis if cfg.dora_axis != "auto" else ("input" if file_format == "kohya" else "output")
    if cfg.type == "dora" and axis == "input" and file_format == "diffusers":
        raise DistLoraError("network.dora_axis = 'input' cannot be written in output.format = 'diffusers' (peft and "
                            "diffusers load DoRA magnitudes per output row only); set network.dora_axis = 'output' "
                            "or output.format = 'kohya'.")
    return axis


def check_network_options(cfg: NetworkConfig, file_format: str, scale_weight_norms: float = 0.0) -> None:
    """Refuse option combinations that cannot be trained or written (before any model loads)."""
    resolve_dora_axis(cfg, file_format)
    if cfg.type in ORTHOGONAL_TYPES:
        if file_format == "diffusers":
            raise DistLoraError(f"network.type = '{cfg.type}' cannot be written in output.format = 'diffusers' (peft's "
                                f"OFT/BOFT rotate a layer's input, the kohya/LyCORIS files every UI reads rotate its "
                                f"output); set output.format = 'kohya'.")
        if scale_weight_norms:
            raise DistLoraError(f"training.scale_weight_norms bounds the norm of a low-rank update; an {cfg.type} "
                                f"rotation is bounded by network.oft_constraint instead. Set "
                                f"training.scale_weight_norms = 0.")
        ratios = [k for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
                  if getattr(cfg, k)]
        if ratios:
            raise DistLoraError(f"network.{ratios[0]} (LoRA+) speeds up LoRA up projections; '{cfg.type}' has none. "
                                f"Set it to 0.")
    dropouts = [k for k in ("rank_dropout", "module_dropout") if getattr(cfg, k)]
    if dropouts and cfg.type not in ("lora", "locon"):
        raise DistLoraError(f"network.{dropouts[0]} applies to lora and locon adapters (kohya's LoRA modules), not "
                            f"network.type = '{cfg.type}'; set it to 0, or use network.dropout for {cfg.type}.")


def attach_network(unet: nn.Module, text_encoders: list[nn.Module], family: str,
                   cfg: NetworkConfig, file_format: str = "kohya") -> AttachedNetwork:
    """Fresh adapters as configured, or (with ``init_from``) the adapters of a file, ready to train."""
    if cfg.init_from:
        from dist_lora.adapters.io import apply_adapter_file

        applied = apply_adapter_file(cfg.init_from, unet, text_encoders, family)
        if cfg.oft_constraint:  # a file's alpha bounds nothing it holds; the recipe's bound is for what follows
            for model in (unet, *text_encoders):
                bound_rotations(model, cfg.oft_constraint)
        trained = [e for i, e in enumerate(text_encoders, 1) if applied.get(i)]
        return AttachedNetwork(trained, applied.get(0, 0), sum(applied.get(i, 0) for i in (1, 2)))
    options = {"dropout": cfg.dropout, "lokr_factor": cfg.lokr_factor, "oft_constraint": cfg.oft_constraint,
               "lokr_decompose_both": cfg.lokr_decompose_both, "dora_axis": resolve_dora_axis(cfg, file_format)}
    trained = selected_text_encoders(text_encoders, cfg)
    plans = [(unet, unet_targets(unet, cfg, family)), *((e, text_encoder_targets(e, cfg)) for e in trained)]
    for model, plan in plans:  # every component checked before any is adapted
        check_plan(model, cfg.type, plan, cfg.lokr_factor)
    counts = [add_network(model, cfg.type, plan, **options) for model, plan in plans]
    return AttachedNetwork(trained, counts[0], sum(counts[1:]))


def unet_lr_weights(unet: nn.Module, cfg: NetworkConfig, family: str) -> dict[int, float]:
    """kohya's block learning-rate weight of each UNet adapter parameter, by id() (empty when no
    *_lr_weight is set)."""
    blocks = unet_block_settings(cfg, family)
    if blocks is None or blocks.lr_weights is None:
        return {}
    layout = UNetLayout.from_config(unet.config) if family == "sdxl" else None  # type: ignore[attr-defined]
    weights: dict[int, float] = {}
    for name, layer in adapter_layers(unet):
        index = block_index(name, family, layout)
        weight = blocks.lr_weights[index] if index >= 0 else 1.0
        for parameter_name, parameter in layer.named_parameters():
            if ADAPTER_NAME in parameter_name.split(".") and "base_layer" not in parameter_name:
                weights[id(parameter)] = weight
    return weights


# Our presets under the names LyCORIS's `create_network(preset=...)` knows: with these, a file's
# ss_network_args rebuild the same network in LyCORIS and sd-scripts (to continue training from it).
LYCORIS_PRESETS = {"attn": "attn-only", "attn_ff": "attn-mlp", "full": "full"}


def network_metadata(cfg: NetworkConfig, file_format: str = "kohya") -> dict[str, str]:
    """``ss_network_module`` / ``ss_network_args`` as kohya and LyCORIS write them."""
    # LoRA+ ratios are network_args in kohya and LyCORIS alike.
    loraplus = {key: str(value) for key, value in (("loraplus_lr_ratio", cfg.loraplus_lr_ratio),
                                                   ("loraplus_unet_lr_ratio", cfg.loraplus_unet_lr_ratio),
                                                   ("loraplus_text_encoder_lr_ratio",
                                                    cfg.loraplus_text_encoder_lr_ratio)) if value}
    # kohya's per-block options, spelled as its network_args (LyCORIS ignores them; the file's shapes
    # carry the ranks either way).
    blocks = {key: block_list_text(getattr(cfg, key)) for key in ("block_dims", "block_alphas", "conv_block_dims",
                                                                   "conv_block_alphas") if getattr(cfg, key)}
    blocks.update({key: getattr(cfg, key) for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
                   if getattr(cfg, key)})
    if cfg.block_lr_zero_threshold:
        blocks["block_lr_zero_threshold"] = str(cfg.block_lr_zero_threshold)
    blocks.update({key: str(getattr(cfg, key)) for key in ("rank_dropout", "module_dropout") if getattr(cfg, key)})
    if cfg.type == "lora":
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({**loraplus, **blocks})}
    algos = {"locon": "locon", "dora": "locon", "loha": "loha", "lokr": "lokr", "oft": "diag-oft", "boft": "boft"}
    args: dict[str, str] = {"algo": algos[cfg.type],
                            "preset": LYCORIS_PRESETS[resolve_preset(cfg)], **loraplus, **blocks}
    if cfg.conv_rank:
        args["conv_dim"] = str(cfg.conv_rank)
        args["conv_alpha"] = str(cfg.conv_alpha or cfg.alpha)
    if cfg.type == "dora":
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(resolve_dora_axis(cfg, file_format) == "output")
    if cfg.type in ORTHOGONAL_TYPES:
        # The file's blocks have the constraint applied; continuing in LyCORIS with it bounds the same way.
        args["constraint"] = str(cfg.oft_constraint)
        args["rescaled"] = "False"
    if cfg.type == "lokr":
        args["factor"] = str(cfg.lokr_factor)
        args["decompose_both"] = str(cfg.lokr_decompose_both)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
