"""Step hooks: what runs around the optimizer steps (metrics, checkpoints, stop handling, and later
sampling, validation and intermediate adapter files), each with a schedule and a scope.

The loop calls ``HookRunner.run`` before the first step (Moment.START), after every optimizer step
(Moment.STEP) and after the last one (Moment.END); a hook runs when its schedule is due. Scope
ALL_RANKS hooks run on every rank at the same moment (they may use collectives: their schedule
depends only on values every rank agrees on); scope MAIN hooks run on the main rank alone and must
not use collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from dist_lora.adapters.max_norm import NormScaling


class Scope(Enum):
    ALL_RANKS = "all ranks"
    MAIN = "main rank"


class Moment(Enum):
    START = "start"
    STEP = "step"
    END = "end"


@dataclass
class HookContext:
    moment: Moment
    step: int  # optimizer steps done
    epoch: int
    total_steps: int
    epoch_finished: bool = False  # this step was the last of its epoch
    stop_requested: bool = False  # a stop signal reached some rank (agreed through the step's all-reduce)
    applied: bool = True  # the step's update was applied (not skipped)
    mean_loss: float = float("nan")
    checkpointed: bool = False  # a hook wrote a checkpoint at this step
    norm_scaling: NormScaling | None = None  # training.scale_weight_norms at the last applied step


@dataclass(frozen=True)
class Schedule:
    every_steps: int = 0  # 0: never by step count
    every_epochs: int = 0  # 0: never by epoch
    at_start: bool = False
    at_end: bool = False

    def due(self, ctx: HookContext) -> bool:
        if ctx.moment is Moment.START:
            return self.at_start
        if ctx.moment is Moment.END:
            return self.at_end
        by_steps = self.every_steps > 0 and ctx.step % self.every_steps == 0
        by_epochs = self.every_epochs > 0 and ctx.epoch_finished and (ctx.epoch + 1) % self.every_epochs == 0
        return by_steps or by_epochs


EVERY_STEP = Schedule(every_steps=1)


class StepHook(Protocol):
    name: str
    schedule: Schedule
    scope: Scope

    def run(self, ctx: HookContext) -> None: ...


class HookRunner:
    """Runs hooks in the order given (checkpoints before the stop check, for instance)."""

    def __init__(self, hooks: list[StepHook], is_main: bool) -> None:
        self.hooks, self.is_main = hooks, is_main

    def run(self, ctx: HookContext) -> HookContext:
        for hook in self.hooks:
            if hook.schedule.due(ctx) and (hook.scope is Scope.ALL_RANKS or self.is_main):
                hook.run(ctx)
        return ctx
