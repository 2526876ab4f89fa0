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
