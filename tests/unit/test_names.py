"""Name mapping against the key names kohya writes for real SDXL (layers_per_block 2, attention in up blocks 0-1)."""

import pytest

from dist_lora.models.names import UNetLayout, kohya_module_key, unet_diffusers_to_ldm

SDXL = UNetLayout(layers_per_block=2, up_block_has_attention=(True, True, False))
SD15 = UNetLayout(layers_per_block=2, up_block_has_attention=(False, True, True, True))


@pytest.mark.parametrize(("diffusers", "ldm"), [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "input_blocks.8.1.transformer_blocks.9.ff.net.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "output_blocks.0.1.transformer_blocks.0.attn1.to_k"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("conv_in", "input_blocks.0.0"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("time_embedding.linear_1.bias", "time_embed.0.bias"),
])
def test_sdxl_names(diffusers: str, ldm: str) -> None:
    assert unet_diffusers_to_ldm(diffusers, SDXL) == ldm


def test_sd15_upsampler_without_attention_uses_slot_1() -> None:
    assert unet_diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", SD15) == "output_blocks.2.1.conv"
    assert unet_diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", SD15) == "output_blocks.5.2.conv"


def test_unknown_name_raises() -> None:
    with pytest.raises(KeyError):
        unet_diffusers_to_ldm("text_model.encoder.layers.0", SDXL)


def test_kohya_key_has_no_dots() -> None:
    key = kohya_module_key("lora_unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert key == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
