"""kohya's per-block ranks and learning rates: block numbering, weight lists, the adapters they give and the
learning rate each adapter trains at."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_lora.adapters.blocks import block_count, block_index, block_settings
from dist_lora.adapters.kohya import module_key_table
from dist_lora.adapters.network import attach_network, network_metadata, unet_lr_weights
from dist_lora.config import NetworkConfig, OptimizerConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.names import UNetLayout
from dist_lora.train.optim import TrainedParameters, build_optimizer, param_groups


def _kohya_block_index(lora_name: str, is_sdxl: bool) -> int:
    """sd-scripts' networks/lora.py get_block_index, restated on kohya module names."""
    import re

    if not is_sdxl:
        m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", lora_name)
        if m:
            i, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + idx if m[1] == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in lora_name else -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, offset in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return offset + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def _full_size_unet(arch: str, tmp_path: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from dist_lora.models.reference import write_config_folder

    config = json.loads((write_config_folder(arch, tmp_path) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(("arch", "family"), [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_every_module_gets_kohyas_block(arch: str, family: str, tmp_path: Path) -> None:
    unet = _full_size_unet(arch, tmp_path)
    layout = UNetLayout.from_config(unet.config) if family == "sdxl" else None
    table = module_key_table(unet, [], family)
    assert len(table) > 250
    seen = set()
    for kohya_name, (_, path) in table.items():
        expected = _kohya_block_index(kohya_name, family == "sdxl")
        assert block_index(path, family, layout) == expected, (path, kohya_name)
        seen.add(expected)
    # SD: IN01-IN11, MID, OUT00-OUT11 hold layers (IN00 is conv_in, outside every block); SDXL: all 23.
    want = set(range(1, 25)) | {-1} if family == "sd1" else set(range(23))
    assert seen == want
    # Named by hand: an attention of the second down block, the mid block's attention, an up sampler.
    if family == "sd1":
        assert block_index("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q", family) == 5
        assert block_index("down_blocks.1.downsamplers.0.conv", family) == 6
        assert block_index("mid_block.attentions.0.proj_in", family) == 12
        assert block_index("up_blocks.2.upsamplers.0.conv", family) == 21
    else:
        assert block_index("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", family, layout) == 5
        assert block_index("mid_block.attentions.0.proj_in", family, layout) == 11
        assert block_index("up_blocks.0.attentions.2.proj_out", family, layout) == 15


def test_lr_weight_lists_follow_kohyas_formulas() -> None:
    common = {"rank": 8, "alpha": 4.0, "conv_rank": 0, "conv_alpha": 0.0, "block_dims": [], "block_alphas": [],
              "conv_block_dims": [], "conv_block_alphas": [], "zero_threshold": 0.0}
    sd = block_settings("sd1", down_lr_weight="sine", mid_lr_weight="0.5", up_lr_weight="cosine+0.25", **common)
    assert sd is not None and sd.lr_weights is not None and len(sd.lr_weights) == 25
    assert sd.lr_weights[:12] == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in range(12)])
    assert sd.lr_weights[12] == 0.5
    assert sd.lr_weights[13:] == pytest.approx([math.sin(math.pi * i / 11 / 2) + 0.25 for i in reversed(range(12))])
    # Down block IN00 has weight sin(0) = 0: its (empty) block gets rank 0, the others keep the rank.
    assert sd.dims == [0] + [8] * 24 and sd.alphas == [4.0] * 25 and sd.conv_dims is None

    xl = block_settings("sdxl", down_lr_weight="1,0.5", mid_lr_weight="", up_lr_weight="linear", **common)
    assert xl is not None and xl.lr_weights is not None and len(xl.lr_weights) == 23
    # Embeddings and out keep 1; a short list is completed with 1; the curves span 9 blocks.
    assert xl.lr_weights == pytest.approx([1.0, 1.0, 0.5] + [1.0] * 7 + [1.0] * 3 + [i / 8 for i in range(9)] + [1.0])
    assert xl.dims[13] == 0 and xl.dims[14] == 8

    assert block_settings("sd1", down_lr_weight="", mid_lr_weight="", up_lr_weight="", **common) is None
    below = block_settings("sd1", down_lr_weight="0.1", mid_lr_weight="", up_lr_weight="",
                           **{**common, "zero_threshold": 0.2})
    assert below is not None and below.lr_weights is not None and below.lr_weights[0] == 0.0


@pytest.mark.parametrize(("options", "message"), [
    ({"block_dims": [4] * 24}, "has 24 values; a sd1 UNet has 25 kohya blocks"),
    ({"block_alphas": [1.0] * 25}, "need network.block_dims"),
    ({"down_lr_weight": "sine+x"}, r"after '\+' must be a number"),
    ({"up_lr_weight": "fast"}, "is not a comma-separated list of numbers"),
    ({"block_dims": [4] * 25, "up_rank": 8}, "network.up_rank and kohya's per-block options"),
])
def test_bad_block_options_are_refused(options: dict[str, object], message: str) -> None:
    from dist_lora.adapters.targets import unet_block_settings

    with pytest.raises(DistLoraError, match=message):
        unet_block_settings(NetworkConfig(**options), "sd1")  # type: ignore[arg-type]


def test_block_ranks_and_learning_rates_on_the_tiny_unet() -> None:
    """Ranks per block (0: no adapter), and one AdamW step moves each adapter its block's weight times as
    far as without weights (Adam's first step is lr x sign, so the ratio is exact)."""
    from dist_lora.models.tiny import build_sd15

    tiny_unet = build_sd15().unet
    dims = [4] * 25
    dims[13:25] = [0] * 12  # no adapters on the up blocks
    dims[1], dims[2] = 2, 6  # IN01/IN02: the first down block's two attentions
    weights = "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"

    def one_step(network: NetworkConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        import copy

        unet = copy.deepcopy(tiny_unet)
        attach_network(unet, [], "sd1", network)
        from dist_lora.adapters.inject import lora_parameters

        cfg = OptimizerConfig(lr=1e-3, weight_decay=0.0)
        params = TrainedParameters(lora_parameters(unet), [], unet_lr_weights=unet_lr_weights(unet, network, "sd1"))
        opt, _ = build_optimizer(param_groups(params, cfg), cfg)
        torch.manual_seed(0)
        named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        for p in named.values():
            p.grad = torch.randn_like(p)
        before = {n: p.detach().clone() for n, p in named.items()}
        opt.step()
        return unet, {n: p.detach() - before[n] for n, p in named.items()}

    base = NetworkConfig(type="lora", rank=4, alpha=4.0, block_dims=dims)
    unet, plain = one_step(base)
    ranks = {n.removesuffix(".lora_A.default.weight"): p.shape[0] for n, p in unet.named_parameters()
             if n.endswith("lora_A.default.weight")}
    assert ranks and not any(n.startswith("up_blocks.") for n in ranks)
    assert all(r == 2 for n, r in ranks.items() if n.startswith("down_blocks.0.attentions.0."))
    assert all(r == 6 for n, r in ranks.items() if n.startswith("down_blocks.0.attentions.1."))
    assert all(r == 4 for n, r in ranks.items() if n.startswith(("down_blocks.1.", "mid_block.")))

    _, weighted = one_step(NetworkConfig(type="lora", rank=4, alpha=4.0, block_dims=dims, down_lr_weight=weights))
    assert plain.keys() == weighted.keys()
    for name in plain:
        factor = 0.5 if name.startswith("down_blocks.") else 1.0
        # float32 rounding of (weight + step) - weight: about 1e-4 of a 1e-3 step
        torch.testing.assert_close(weighted[name], factor * plain[name], rtol=1e-3, atol=1e-7, msg=name)

    args = json.loads(network_metadata(NetworkConfig(type="lora", block_dims=dims, down_lr_weight="sine"))
                      ["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["down_lr_weight"] == "sine"


def test_block_counts() -> None:
    assert block_count("sd1") == block_count("sd2") == 25 and block_count("sdxl") == 23
