"""The published architectures of SD 1.5 and SDXL base (their diffusers config.json values), for
building full-size models with random weights (GPU benchmarks) or on the meta device (memory plans)
without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu", "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}
_OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 512}
_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 1280}


def _vae(sample_size: int, scaling_factor: float) -> dict[str, Any]:
    return {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": sample_size,
            "scaling_factor": scaling_factor}


_UNET_COMMON = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
                "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32}

FULL_SIZE: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        "unet": {**_UNET_COMMON, "sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "attention_head_dim": 8, "cross_attention_dim": 768},
        "vae": _vae(512, 0.18215),
        "text_encoder": _CLIP_L,
    },
    # SD 2.1 (768-v): OpenCLIP ViT-H as diffusers ships it (23 of its 24 layers: SD 2 reads the penultimate).
    "sd21": {
        "unet": {**_UNET_COMMON, "sample_size": 96, "block_out_channels": [320, 640, 1280, 1280],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True},
        "vae": _vae(768, 0.18215),
        "text_encoder": _OPEN_CLIP_H,
    },
    "sdxl": {
        "unet": {**_UNET_COMMON, "sample_size": 128, "block_out_channels": [320, 640, 1280],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                 "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": _vae(1024, 0.13025),
        "text_encoder": _CLIP_L,
        "text_encoder_2": _BIG_G,
    },
}

def sdxl_pooled_width(unet_config: Any) -> int:
    """Width of the pooled text embedding an SDXL UNet expects: its added-condition input less the six
    micro-conditioning ids (sizes and crop), each embedded to addition_time_embed_dim."""
    return int(unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"])


# Parameter counts of the released checkpoints, to check the configs above against.
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}

_CLASSES = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}


def write_config_folder(arch: str, out: str | Path) -> Path:
    """A diffusers-style folder holding only the components' config.json files (no weights): enough for
    `dist-lora plan` and for building the models on a device with random weights."""
    folder = Path(out)
    index: dict[str, Any] = {"_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else
                             "StableDiffusionPipeline"}
    for component, config in FULL_SIZE[arch].items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        (folder / component / "config.json").write_text(json.dumps(config, indent=1))
        index[component] = _CLASSES[component]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
