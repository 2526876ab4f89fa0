import json
from pathlib import Path

import pytest

from dist_lora.errors import DistLoraError
from dist_lora.parallel import TrainingShape, check_launch


def _shape(bnb: bool) -> TrainingShape:
    return TrainingShape("no", 1, 2, 1.0, bitsandbytes_optimizer=bnb)


def test_bitsandbytes_with_deepspeed_offload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(DistLoraError, match="bitsandbytes optimizer cannot run with DeepSpeed optimizer offload"):
        check_launch(_shape(bnb=True))
    check_launch(_shape(bnb=False))  # AdamW with offload is fine
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    check_launch(_shape(bnb=True))  # no offload: bitsandbytes is fine


def test_fp16_needs_cuda() -> None:
    with pytest.raises(DistLoraError, match="fp16.*needs a CUDA GPU"):
        check_launch(TrainingShape("fp16", 1, 2, 1.0, False))


def test_zero3_checkpointing_needs_a_fixed_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_lora import parallel

    with pytest.raises(DistLoraError, match=r"deepspeed >= 0\.19\.4 \(installed: 0\.18\.2\).*zero2"):
        parallel.check_zero3_checkpointing("0.18.2")
    parallel.check_zero3_checkpointing("0.19.4")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(parallel, "_installed_deepspeed", lambda: "0.17.0")
    with pytest.raises(DistLoraError, match="ZeRO-3 with training.gradient_checkpointing"):
        check_launch(TrainingShape("no", 1, 2, 1.0, False, gradient_checkpointing=True))
    check_launch(TrainingShape("no", 1, 2, 1.0, False, gradient_checkpointing=False))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_launch(TrainingShape("no", 1, 2, 1.0, False, gradient_checkpointing=True))


def test_a_deepspeed_config_file_gives_the_stage_and_offload(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """accelerate passes deepspeed_config_file's settings through the file alone, not its variables."""
    from dist_lora import parallel

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", raising=False)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert parallel.requested_zero_stage() == 3
    with pytest.raises(DistLoraError, match="bitsandbytes optimizer cannot run with DeepSpeed optimizer offload"):
        check_launch(_shape(bnb=True))
    config.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}}}))
    assert parallel.requested_zero_stage() == 1
    check_launch(_shape(bnb=True))
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    assert parallel.requested_zero_stage() == 0  # DeepSpeed without a zero_optimization section
    config.write_text("{not json")
    with pytest.raises(DistLoraError, match=rf"deepspeed_config_file '{config}' .* cannot be read as JSON"):
        parallel.requested_zero_stage()
