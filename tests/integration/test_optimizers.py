"""Optimizers by short name (CAME, ADOPT, Muon, Schedule-Free AdamW) and by import path: refused before any
model loads when they cannot be built or run, trained for real, resumed bitwise, and under DeepSpeed
ZeRO-2 (ADOPT) equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.config import OptimizerConfig, config_from_dict
from dist_lora.errors import DistLoraError
from dist_lora.train import trainer
from dist_lora.train.optimizer_classes import _muon_groups, check_optimizer
from dist_lora.train.trainer import train
from dist_lora.utils.stop_signals import Preempted
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import identical_samples_shards, run_training

NAMED = ["came", "adopt", "muon", "adamw_schedulefree", "torch.optim.RAdam"]


@pytest.mark.parametrize("name,message", [
    ("sgd_but_wrong", "is not one of adamw"),
    ("torch.optim.NoSuchThing", "module 'torch.optim' has no 'NoSuchThing'"),
    ("no_such_package.Optimizer", "no module 'no_such_package' can be imported"),
    ("collections.OrderedDict", "collections.OrderedDict is not an optimizer"),
])
def test_an_optimizer_that_cannot_be_built_is_refused(name: str, message: str) -> None:
    with pytest.raises(DistLoraError, match="optimizer.type") as error:
        check_optimizer(OptimizerConfig(type=name), deepspeed=False)
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["came", "muon", "adamw_schedulefree", "schedulefree.SGDScheduleFree"])
def test_deepspeed_refuses_shape_aware_and_weight_swapping_optimizers(name: str) -> None:
    with pytest.raises(DistLoraError, match="cannot run under DeepSpeed"):
        check_optimizer(OptimizerConfig(type=name), deepspeed=True)
    check_optimizer(OptimizerConfig(type=name), deepspeed=False)


def test_deepspeed_runs_element_wise_ones() -> None:
    for name in ("adopt", "torch.optim.RAdam", "adamw"):
        check_optimizer(OptimizerConfig(type=name), deepspeed=True)


def test_the_check_comes_before_any_model_loads(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "load_components", no_loading)
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run",
                            optimizer={"type": "torch.optim.Nope"})
    with pytest.raises(DistLoraError, match="optimizer.type 'torch.optim.Nope'"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_muon_takes_the_matrices_and_adamw_the_rest() -> None:
    matrix, conv, magnitude = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(2, 3, 3, 3)), \
        torch.nn.Parameter(torch.ones(4))
    groups = _muon_groups([{"params": [matrix, magnitude, conv], "lr": 0.5}])
    assert [(g["use_muon"], [p.shape for p in g["params"]], g["lr"]) for g in groups] == [
        (True, [matrix.shape, conv.shape], 0.5), (False, [magnitude.shape], 0.5)]


def _raw(model: Path, shards: Path, out: Path, name: str, **checkpoint: object) -> dict:
    return tiny_train_config(model, shards, out, optimizer={"type": name, "lr": 3e-3},
                             network={"type": "dora"} if name == "muon" else {},
                             training={"max_steps": 4, "batch_size": 2}, checkpoint={"every_steps": 2, **checkpoint})


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_each_trains_and_resumes_bitwise(name: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                         tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    straight = train(config_from_dict(_raw(model, shapes_shards, tmp_path / "straight", name)))
    assert all(torch.isfinite(torch.tensor(straight.losses)))
    metrics = [json.loads(x) for x in straight.metrics_path.read_text().splitlines()]
    assert metrics[-1]["optimizer"].split(".")[0] == name.split(".")[0] if "." in name else \
        metrics[-1]["optimizer"].split(".")[0] in ("pytorch_optimizer", "schedulefree")
    with pytest.raises(Preempted):
        train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", name, stop_at_step=2)))
    train(config_from_dict(_raw(model, shapes_shards, tmp_path / "split", name, resume="latest")))
    want, got = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("straight", "split"))
    assert max(t.abs().max().item() for k, t in want.items() if "lora_up" in k) > 1e-4
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


@pytest.mark.slow
def test_schedule_free_exports_its_average(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    """The file holds the evaluation point x; the model in memory is back at the training point y. With
    AdamW, which has one point, the two are the same."""
    from dist_lora.adapters.kohya import kohya_tensors

    for name in ("adamw_schedulefree", "adamw"):
        result = train(config_from_dict(_raw(tiny_models["sd15"], shapes_shards, tmp_path / name, name)))
        exported = load_file(str(result.adapter_path))
        model = result.model
        in_memory = kohya_tensors(model.unet, list(model.text_encoders), "sd1")
        weights = [k for k in exported if not k.endswith(".alpha")]
        assert weights and set(weights) <= in_memory.keys()
        same = all(torch.equal(exported[k], in_memory[k]) for k in weights)
        assert same == (name == "adamw"), name


@pytest.mark.slow
def test_adopt_under_zero2_on_two_processes_equals_one(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shards = identical_samples_shards(tmp_path / "data")

    def raw(out: str, batch: int) -> dict:
        return tiny_train_config(tiny_models["sd15"], shards, tmp_path / out,
                                 optimizer={"type": "adopt", "lr": 1e-3, "max_grad_norm": 0.0},
                                 training={"max_steps": 3, "batch_size": batch})

    run_training(raw("one", 4), tmp_path)
    run_training(raw("zero2", 2), tmp_path, launch="zero2.yaml")
    want, got = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("one", "zero2"))
    assert max(t.abs().max().item() for k, t in want.items() if "lora_up" in k) > 1e-4
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=1e-4, msg=key)
