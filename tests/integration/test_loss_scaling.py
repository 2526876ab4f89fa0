"""fp16 loss scaling through the real training loop, on CPU with torch's CPU GradScaler.

accelerate only builds a loss scaler on GPUs; the harness gives the CPU accelerator the same
``torch.amp.GradScaler`` that it would build on CUDA, so the loop's fp16 path runs unchanged.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora import parallel
from dist_lora.config import config_from_dict
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config

INIT_SCALE = 2.0**10


@pytest.fixture
def cpu_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> list[torch.amp.GradScaler]:
    made: list[torch.amp.GradScaler] = []
    original = parallel.make_accelerator

    def with_scaler(shape: parallel.TrainingShape):  # type: ignore[no-untyped-def]
        accelerator = original(shape)
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
        made.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(parallel, "check_launch", lambda shape: None)
    monkeypatch.setattr(parallel, "make_accelerator", with_scaler)
    return made


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fp16_overflow_halves_the_scale_skips_and_continues(cpu_grad_scaler: list[torch.amp.GradScaler],
                                                            tiny_models: dict[str, Path], shapes_shards: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Overflow at steps 2 and 3: more in a row than max_consecutive_skips allows, which a guard that
    # skipped before the scaler saw the overflow would have turned into a stopped run.
    monkeypatch.setenv("DIST_LORA_INJECT_INF_GRAD", "0:2,3")
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "fp16",
                            training={"mixed_precision": "fp16", "max_steps": 6, "max_consecutive_skips": 2})
    result = train(config_from_dict(raw))
    scaler = cpu_grad_scaler[-1]
    assert scaler.get_scale() == INIT_SCALE / 4  # halved once per overflow, never grown back
    metrics = _metrics(result.run_dir)
    assert [m["loss_scale_skips"] for m in metrics] == [0, 1, 2, 2, 2, 2]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 2, 2, 2, 2]
    assert result.steps == 6 and len(result.losses) == 4
    adapter = load_file(str(result.adapter_path))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    # The LR schedule advanced on skipped steps too (constant schedule: check the step count it saw).
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def test_fp16_skipped_steps_leave_the_adapter_unchanged(cpu_grad_scaler: list[torch.amp.GradScaler],
                                                        tiny_models: dict[str, Path], shapes_shards: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps with the second overflowing equal one step: the skipped update changed nothing."""
    base = {"mixed_precision": "fp16", "seed": 3}
    one = train(config_from_dict(tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "one",
                                                   training={**base, "max_steps": 1})))
    monkeypatch.setenv("DIST_LORA_INJECT_INF_GRAD", "0:2")
    two = train(config_from_dict(tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "two",
                                                   training={**base, "max_steps": 2})))
    a, b = load_file(str(one.adapter_path)), load_file(str(two.adapter_path))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_non_finite_loss_still_stops_under_fp16(cpu_grad_scaler: list[torch.amp.GradScaler],
                                                tiny_models: dict[str, Path], shapes_shards: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_lora.train.guards import NonFiniteRunError

    monkeypatch.setenv("DIST_LORA_INJECT_NAN", "0:2,3")
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "nan",
                            training={"mixed_precision": "fp16", "max_steps": 6, "max_consecutive_skips": 2})
    with pytest.raises(NonFiniteRunError, match="2 optimizer steps in a row"):
        train(config_from_dict(raw))
