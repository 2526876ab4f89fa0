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

from dist_lora.config import NetworkConfig
from dist_lora.errors import DistLoraError

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


def unet_targets(unet: nn.Module, cfg: NetworkConfig) -> TargetPlan:
    preset = resolve_preset(cfg)
    explicit = cfg.unet_target_modules
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
