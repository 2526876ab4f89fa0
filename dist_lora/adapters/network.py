"""Attach the configured network (or one read from a file) to a base model's UNet and text encoders."""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from dist_lora.adapters.inject import add_network
from dist_lora.adapters.targets import resolve_preset, text_encoder_targets, unet_targets
from dist_lora.config import NetworkConfig


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


def attach_network(unet: nn.Module, text_encoders: list[nn.Module], family: str,
                   cfg: NetworkConfig) -> AttachedNetwork:
    """Fresh adapters as configured, or (with ``init_from``) the adapters of a file, ready to train."""
    if cfg.init_from:
        from dist_lora.adapters.io import apply_adapter_file

        applied = apply_adapter_file(cfg.init_from, unet, text_encoders, family)
        trained = [e for i, e in enumerate(text_encoders, 1) if applied.get(i)]
        return AttachedNetwork(trained, applied.get(0, 0), sum(applied.get(i, 0) for i in (1, 2)))
    options = {"dropout": cfg.dropout, "lokr_factor": cfg.lokr_factor,
               "lokr_decompose_both": cfg.lokr_decompose_both}
    unet_count = add_network(unet, cfg.type, unet_targets(unet, cfg), **options)
    trained = selected_text_encoders(text_encoders, cfg)
    te_count = sum(add_network(e, cfg.type, text_encoder_targets(e, cfg), **options) for e in trained)
    return AttachedNetwork(trained, unet_count, te_count)


# Our presets under the names LyCORIS's `create_network(preset=...)` knows: with these, a file's
# ss_network_args rebuild the same network in LyCORIS and sd-scripts (to continue training from it).
LYCORIS_PRESETS = {"attn": "attn-only", "attn_ff": "attn-mlp", "full": "full"}


def network_metadata(cfg: NetworkConfig) -> dict[str, str]:
    """``ss_network_module`` / ``ss_network_args`` as kohya and LyCORIS write them."""
    # LoRA+ ratios are network_args in kohya and LyCORIS alike.
    loraplus = {key: str(value) for key, value in (("loraplus_lr_ratio", cfg.loraplus_lr_ratio),
                                                   ("loraplus_unet_lr_ratio", cfg.loraplus_unet_lr_ratio),
                                                   ("loraplus_text_encoder_lr_ratio",
                                                    cfg.loraplus_text_encoder_lr_ratio)) if value}
    if cfg.type == "lora":
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps(loraplus)}
    args: dict[str, str] = {"algo": {"locon": "locon", "dora": "locon", "loha": "loha", "lokr": "lokr"}[cfg.type],
                            "preset": LYCORIS_PRESETS[resolve_preset(cfg)], **loraplus}
    if cfg.conv_rank:
        args["conv_dim"] = str(cfg.conv_rank)
        args["conv_alpha"] = str(cfg.conv_alpha or cfg.alpha)
    if cfg.type == "dora":
        args["dora_wd"] = "True"
    if cfg.type == "lokr":
        args["factor"] = str(cfg.lokr_factor)
        args["decompose_both"] = str(cfg.lokr_decompose_both)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
