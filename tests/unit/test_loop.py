"""The training loop with fakes: a two-weight model, an in-memory loader and recording hooks, in one process
on a real (CPU) accelerator. Hook order, checkpoints, stops and a resume, without launching anything."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from dist_lora import parallel
from dist_lora.config import Config, config_from_dict
from dist_lora.data.position import EpochProgress
from dist_lora.data.shards import Batch
from dist_lora.train.checkpoint import Checkpointer, CheckpointWorld
from dist_lora.train.checkpoint_format import Storage
from dist_lora.train.hooks import HookContext, Schedule, Scope
from dist_lora.train.loop import TrainingLoop
from dist_lora.train.loop_hooks import CheckpointHook, StopHook
from dist_lora.train.run_plan import RunPlan
from dist_lora.train.state import TrainState
from dist_lora.train.tracking import SampleKeyLog
from dist_lora.utils.stop_signals import Preempted, StopSignals
from tests.conftest import tiny_train_config

BATCHES_PER_EPOCH = 4


class FakeLoader:
    """Four one-sample batches per epoch; sample i of epoch e is x = e * 10 + i."""

    def __init__(self) -> None:
        self.progress = EpochProgress()
        self.epochs: list[tuple[int, EpochProgress | None]] = []

    def epoch(self, epoch: int, resume: EpochProgress | None = None) -> Iterator[Batch]:
        self.epochs.append((epoch, resume))
        for i in range(BATCHES_PER_EPOCH):
            x = torch.tensor([[float(epoch * 10 + i)]])
            yield Batch([f"e{epoch}-{i}"], [""], [{}], torch.ones(1), pixels=x)


class FakeRunner:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[tuple[str, int, int]] = []

    def loss(self, batch: Batch, step: int, micro_in_step: int) -> torch.Tensor:
        self.calls.append((batch.keys[0], step, micro_in_step))
        assert batch.pixels is not None
        return ((self.model(batch.pixels / 10) - 1.0) ** 2).mean()


@dataclass
class FakeSetup:
    model: Any
    optimizer: Any
    lr_scheduler: Any
    trainable_params: list[nn.Parameter]
    ema: Any = None
    adapter_dropout: Any = None


@dataclass
class Recorder:
    """A hook that writes down when it ran."""

    name: str
    log: list[tuple[str, str, int]]
    scope: Scope = Scope.ALL_RANKS
    schedule: Schedule = field(default_factory=lambda: Schedule(every_steps=1, at_start=True, at_end=True))

    def run(self, ctx: HookContext) -> None:
        self.log.append((self.name, ctx.moment.value, ctx.step))


class ModelWeights:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


@dataclass
class Run:
    loop: TrainingLoop
    model: nn.Module
    runner: FakeRunner
    loader: FakeLoader
    state: TrainState
    checkpointer: Checkpointer
    log: list[tuple[str, str, int]]


def _config(tmp_path: Path, accumulation: int) -> Config:
    return config_from_dict(tiny_train_config(tmp_path / "model", tmp_path / "shards", tmp_path / "out",
                                              training={"gradient_accumulation_steps": accumulation}))


def _run(tmp_path: Path, *, total_steps: int, accumulation: int = 2, stop_at: int = 0, every: int = 0,
         resume_from: Path | None = None) -> Run:
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = TrainState()
    checkpointer = Checkpointer(tmp_path, 2, CheckpointWorld(0, 1, lambda: None))
    checkpointer.register("train_state", state, Storage.MAIN_JSON)
    checkpointer.register("model", ModelWeights(model), Storage.MAIN_TENSORS)
    checkpointer.register("optimizer", optimizer, Storage.MAIN_TORCH)
    checkpointer.register("lr_scheduler", scheduler, Storage.MAIN_TORCH)
    if resume_from is not None:
        checkpointer.load(resume_from)
    log: list[tuple[str, str, int]] = []
    signals = StopSignals()
    hooks = [Recorder("first", log), CheckpointHook(checkpointer, every), Recorder("main-only", log, Scope.MAIN),
             StopHook(checkpointer, signals, stop_at, any_rank=lambda flag: flag)]
    epochs = -(-total_steps * accumulation // BATCHES_PER_EPOCH)
    ends = [BATCHES_PER_EPOCH] * epochs
    ends[-1] = total_steps * accumulation - BATCHES_PER_EPOCH * (epochs - 1)
    cfg = _config(tmp_path, accumulation)
    loader, runner = FakeLoader(), FakeRunner(model)
    setup = FakeSetup(model, optimizer, scheduler, list(model.parameters()))
    loop = TrainingLoop(cfg, setup, runner, acc, parallel.world(acc), loader,  # type: ignore[arg-type]
                        RunPlan(total_steps, ends), state, hooks, SampleKeyLog(tmp_path, enabled=False), signals)
    return Run(loop, model, runner, loader, state, checkpointer, log)


def test_hooks_run_in_order_at_start_every_step_and_end(tmp_path: Path) -> None:
    run = _run(tmp_path, total_steps=3)
    run.loop.run()
    expected = [(name, "start", 0) for name in ("first", "main-only")]
    for step in (1, 2, 3):
        expected += [("first", "step", step), ("main-only", "step", step)]
    expected += [("first", "end", 3), ("main-only", "end", 3)]
    assert run.log == expected
    # Two micro-batches per step, over epoch boundaries, with the micro-step index inside each step.
    assert [(key, step, micro) for key, step, micro in run.runner.calls] == [
        ("e0-0", 0, 0), ("e0-1", 0, 1), ("e0-2", 1, 0), ("e0-3", 1, 1), ("e1-0", 2, 0), ("e1-1", 2, 1)]
    assert (run.state.step, run.state.micro_step, run.state.epoch, run.state.batch_in_epoch) == (3, 6, 1, 2)
    assert len(run.loop.losses) == 3 and run.state.first_loss == run.loop.losses[0]
    assert run.checkpointer.last_step == -1  # no checkpoint was asked for


def test_a_main_scope_hook_does_not_run_on_other_ranks(tmp_path: Path) -> None:
    run = _run(tmp_path, total_steps=1)
    run.loop.hooks.is_main = False
    run.loop.run()
    assert {name for name, _, _ in run.log} == {"first"}


def test_stop_at_step_checkpoints_and_the_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = _run(tmp_path / "straight", total_steps=5, every=2)
    straight.loop.run()
    assert straight.checkpointer.last_step == 5  # every 2 steps and at the end
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["step-00000004",
                                                                                        "step-00000005"]
    final = {k: v.clone() for k, v in straight.model.state_dict().items()}

    stopped = _run(tmp_path / "split", total_steps=5, every=2, stop_at=3)
    with pytest.raises(Preempted) as stop:
        stopped.loop.run()
    folder = tmp_path / "split" / "checkpoints" / "step-00000003"
    assert stop.value.step == 3 and stop.value.checkpoint == str(folder) and stop.value.reason == \
        "checkpoint.stop_at_step"
    assert ("first", "step", 3) in stopped.log and ("first", "end", 3) not in stopped.log  # stopped, not ended

    resumed = _run(tmp_path / "split", total_steps=5, every=2, resume_from=folder)
    assert (resumed.state.step, resumed.state.micro_step, resumed.state.epoch, resumed.state.batch_in_epoch) == \
        (3, 6, 1, 2)
    resumed.loop.run()
    # The replayed part of epoch 1 is skipped, not trained on again; the weights equal the straight run's.
    assert [key for key, _, _ in resumed.runner.calls] == ["e1-2", "e1-3", "e2-0", "e2-1"]
    assert all(torch.equal(final[k], v) for k, v in resumed.model.state_dict().items())
    assert resumed.log[0] == ("first", "start", 3) and resumed.log[-2:] == [("first", "end", 5),
                                                                           ("main-only", "end", 5)]


def test_a_signal_during_start_up_stops_before_the_first_step(tmp_path: Path) -> None:
    run = _run(tmp_path, total_steps=2)
    run.loop.signals.received = "SIGTERM"
    with pytest.raises(Preempted, match="SIGTERM"):
        run.loop.run()
    assert run.runner.calls == [] and run.log == []


def test_a_signal_stops_on_a_checkpoint_at_the_end_of_the_step(tmp_path: Path) -> None:
    run = _run(tmp_path, total_steps=4)
    original = run.runner.loss

    def signalled(batch: Batch, step: int, micro_in_step: int) -> torch.Tensor:
        if step == 1:
            run.loop.signals.received = "SIGUSR1"
        return original(batch, step, micro_in_step)

    run.runner.loss = signalled  # type: ignore[method-assign]
    with pytest.raises(Preempted) as stop:
        run.loop.run()
    assert stop.value.step == 2 and stop.value.reason == "SIGUSR1"
    assert (tmp_path / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
