"""Attention backend selection, VAE precision, and out-of-memory handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_lora.config import config_from_dict
from dist_lora.errors import DistLoraError
from dist_lora.models.load import load_components
from dist_lora.train import trainer
from dist_lora.train.memory import OutOfMemory, out_of_memory_advice, set_attention
from tests.conftest import tiny_train_config


def test_xformers_without_cuda_errors_or_falls_back(tiny_models: dict[str, Path]) -> None:
    unet = load_components(str(tiny_models["sd15"])).unet
    with pytest.raises(DistLoraError, match="xformers needs a CUDA GPU.*attention_fallback"):
        set_attention(unet, "xformers", fallback=False)
    with pytest.warns(UserWarning, match="'xformers' replaced by PyTorch SDPA"):
        assert set_attention(unet, "xformers", fallback=True) == "sdpa"
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_advice_follows_the_config(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path, training={"batch_size": 4}))
    advice = out_of_memory_advice(cfg, world_size=4, zero_stage=2)
    assert "training.batch_size=2 with training.gradient_accumulation_steps=2" in advice
    assert "gradient_checkpointing=true" in advice and "adamw8bit" in advice and "zero3" in advice
    lean = config_from_dict(tiny_train_config(
        tiny_models["sd15"], shapes_shards, tmp_path, optimizer={"type": "adamw8bit"},
        training={"batch_size": 1, "gradient_checkpointing": True, "mixed_precision": "bf16"}))
    advice = out_of_memory_advice(lean, world_size=1, zero_stage=0)
    assert "batch_size" not in advice and "gradient_checkpointing" not in advice and "8-bit" not in advice


def test_out_of_memory_gives_advice_and_keeps_checkpoint(monkeypatch: pytest.MonkeyPatch,
                                                         tiny_models: dict[str, Path], shapes_shards: Path,
                                                         tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run", training={"max_steps": 2},
                            checkpoint={"every_steps": 2})
    trainer.train(config_from_dict(raw))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    before = {str(p.relative_to(checkpoint)): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}

    def exhausted(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.StepRunner, "loss", exhausted)
    raw["training"]["max_steps"] = 4
    raw["checkpoint"]["resume"] = "latest"
    raw["output"]["overwrite"] = True
    with pytest.raises(OutOfMemory, match=r"(?s)ran out of memory.*gradient_checkpointing=true"):
        trainer.train(config_from_dict(raw))
    assert {str(p.relative_to(checkpoint)): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before


def test_vae_in_training_precision_when_asked(tiny_models: dict[str, Path], shapes_shards: Path,
                                              tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run",
                            training={"max_steps": 1, "mixed_precision": "bf16", "vae_fp32": False})
    result = trainer.train(config_from_dict(raw))
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_xformers_test_kernel_failure_errors_or_falls_back(tiny_models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """xformers imports but its kernel cannot run on this GPU/build: handled like a failed import."""
    from dist_lora.train import memory

    unet = load_components(str(tiny_models["sd15"])).unet

    def kernel_fails() -> None:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(memory, "xformers_unavailable", lambda: "")
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", kernel_fails)
    with pytest.raises(DistLoraError, match="test kernel failed.*No operator found.*attention_fallback"):
        set_attention(unet, "xformers", fallback=False)
    with pytest.warns(UserWarning, match="test kernel failed"):
        assert set_attention(unet, "xformers", fallback=True) == "sdpa"
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_out_of_memory_while_loading_exits_with_its_own_status(monkeypatch: pytest.MonkeyPatch,
                                                              tiny_models: dict[str, Path], shapes_shards: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dist_lora.cli import main
    from dist_lora.config import to_toml
    from dist_lora.train.memory import OUT_OF_MEMORY_EXIT_CODE

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    monkeypatch.setattr(trainer, "load_components", exhausted)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(config_from_dict(tiny_train_config(tiny_models["sd15"], shapes_shards,
                                                                 tmp_path / "run"))))
    assert main(["train", "--config", str(recipe)]) == OUT_OF_MEMORY_EXIT_CODE == 4
    assert "ran out of memory" in capsys.readouterr().err


def test_adapted_layers_keep_the_autocast_dtype(tiny_models: dict[str, Path]) -> None:
    """With fp32 adapters under bf16 autocast, peft would cast every adapted layer's input up to fp32
    first; after compute_in_input_dtype no such copy is made and the output is unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_lora.adapters.inject import add_lora, compute_in_input_dtype, lora_parameters

    class Fp32Copies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32 \
                    and args[0].dtype == torch.bfloat16 and args[0].dim() > 1:
                self.count += 1
            return func(*args, **kwargs)

    unet = load_components(str(tiny_models["sd15"])).unet.to(torch.bfloat16).requires_grad_(False)
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4.0)
    for p in lora_parameters(unet):
        p.data = torch.randn_like(p.data).float() * 0.1
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    outputs, copies = [], []
    for disable in (False, True):
        if disable:
            assert compute_in_input_dtype(unet) > 0
        mode = Fp32Copies()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), mode:
            outputs.append(unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample)
        copies.append(mode.count)
    assert copies[0] > 0 and copies[1] == 0, copies
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), atol=2e-2, rtol=2e-2)
