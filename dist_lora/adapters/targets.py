"""Which modules get adapters, and with which rank and alpha.

The result is explicit: every targeted module by full name with its own rank/alpha, which peft takes as
``target_modules`` plus ``rank_pattern`` / ``alpha_pattern``. Presets follow kohya and LyCORIS:
``attn_ff`` is kohya's LoRA (every linear of the transformer blocks, and SD 1.x's 1x1 proj convs),
``full`` adds what LoCon/LyCORIS adapt (resnet convs and time projections, down/up-sampler convs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from dist_lora.adapters.blocks import BlockSettings, block_index, block_settings
from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.names import UNetLayout

_ATTN = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FF = re.compile(r"\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$")
_CONV = re.compile(r"\.(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(down|up)samplers\.0\.conv)$")
_BLOCK = re.compile(r"^(down_blocks|mid_block|up_blocks)\.")


@dataclass(frozen=True)
class ModuleRank:
    rank: int
    alpha: float


@dataclass(frozen=True)
class TargetPlan:
    """Full module name -> rank/alpha, for one model."""

    modules: dict[str, ModuleRank]

    def peft_kwargs(self) -> dict[str, object]:
        names = sorted(self.modules)
        # peft reads pattern keys as regexes matched against a dotted suffix of the module name.
        return {"target_modules": names,
                "rank_pattern": {re.escape(n): m.rank for n, m in self.modules.items()},
                "alpha_pattern": {re.escape(n): m.alpha for n, m in self.modules.items()}}


def resolve_preset(cfg: NetworkConfig) -> str:
    if cfg.preset != "auto":
        return cfg.preset
    return "attn_ff" if cfg.type in ("lora", "dora") else "full"


def _in_preset(name: str, preset: str) -> bool:
    if _ATTN.search(name):
        return True
    if preset in ("attn_ff", "full") and _FF.search(name):
        return True
    return preset == "full" and bool(_CONV.search(name))


def _is_spatial_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _block_override(name: str, cfg: NetworkConfig) -> tuple[int, float]:
    match = _BLOCK.match(name)
    if not match:
        return 0, 0.0
    block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[match[1]]
    return getattr(cfg, f"{block}_rank"), getattr(cfg, f"{block}_alpha")


def unet_block_settings(cfg: NetworkConfig, family: str) -> BlockSettings | None:
    """The per-block options of ``cfg`` (None when none is set); they replace down/mid/up_rank."""
    settings = block_settings(family, rank=cfg.rank, alpha=cfg.alpha, conv_rank=cfg.conv_rank,
                              conv_alpha=cfg.conv_alpha, block_dims=cfg.block_dims, block_alphas=cfg.block_alphas,
                              conv_block_dims=cfg.conv_block_dims, conv_block_alphas=cfg.conv_block_alphas,
                              down_lr_weight=cfg.down_lr_weight, mid_lr_weight=cfg.mid_lr_weight,
                              up_lr_weight=cfg.up_lr_weight, zero_threshold=cfg.block_lr_zero_threshold)
    coarse = [k for k in ("down_rank", "mid_rank", "up_rank", "down_alpha", "mid_alpha", "up_alpha")
              if getattr(cfg, k)]
    if settings is not None and coarse:
        raise DistLoraError(f"network.{coarse[0]} and kohya's per-block options (block_dims, *_lr_weight) both set "
                            f"ranks per block; use one of the two.")
    return settings


def _block_rank(spatial: bool, index: int, blocks: BlockSettings) -> ModuleRank | None:
    """A module's rank/alpha from the per-block lists; None outside kohya's blocks."""
    if index < 0:
        return None
    if spatial and blocks.conv_dims is not None and blocks.conv_alphas is not None:
        return ModuleRank(blocks.conv_dims[index], blocks.conv_alphas[index])
    return ModuleRank(blocks.dims[index], blocks.alphas[index])


def unet_targets(unet: nn.Module, cfg: NetworkConfig, family: str = "sd1") -> TargetPlan:
    """Every UNet module that gets an adapter, with its rank and alpha; a per-block rank of 0 leaves the
    module out."""
    preset = resolve_preset(cfg)
    explicit = cfg.unet_target_modules
    blocks = unet_block_settings(cfg, family)
    layout = UNetLayout.from_config(unet.config) if blocks and family == "sdxl" else None  # type: ignore[attr-defined]
    chosen: dict[str, ModuleRank] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if explicit:
            if not any(name == t or name.endswith("." + t) for t in explicit):
                continue
        elif not _in_preset(name, preset):
            continue
        spatial = _is_spatial_conv(module)
        rank = (cfg.conv_rank or cfg.rank) if spatial else cfg.rank
        alpha = (cfg.conv_alpha or cfg.alpha) if spatial else cfg.alpha
        if blocks is not None:
            per_block = _block_rank(spatial, block_index(name, family, layout), blocks)
            if per_block is not None and per_block.rank == 0:
                continue
            chosen[name] = per_block or ModuleRank(rank, alpha)
            continue
        block_rank, block_alpha = _block_override(name, cfg)
        chosen[name] = ModuleRank(block_rank or rank, block_alpha or alpha)
    if not chosen:
        raise DistLoraError(f"network: no UNet module matched preset '{preset}' / unet_target_modules "
                            f"{explicit}; module names end like 'to_q', 'ff.net.0.proj' or 'conv1'.")
    return TargetPlan(chosen)


def text_encoder_targets(encoder: nn.Module, cfg: NetworkConfig) -> TargetPlan:
    chosen = {name: ModuleRank(cfg.rank, cfg.alpha) for name, module in encoder.named_modules()
              if isinstance(module, nn.Linear)
              and any(name == t or name.endswith("." + t) for t in cfg.text_encoder_target_modules)}
    if not chosen:
        raise DistLoraError(f"network.text_encoder_target_modules {cfg.text_encoder_target_modules} matched no "
                            f"text-encoder linear; names end like 'q_proj' or 'fc1'.")
    return TargetPlan(chosen)
