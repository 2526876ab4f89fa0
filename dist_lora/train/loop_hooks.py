"""The training loop's built-in step hooks: metrics, checkpoints and the stop check. Each is given the
collaborators it uses (the checkpointer, the train state, its own settings), never the loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dist_lora import parallel
from dist_lora.data.shards import DataStats
from dist_lora.train.checkpoint import Checkpointer
from dist_lora.train.hooks import EVERY_STEP, HookContext, Moment, Schedule, Scope
from dist_lora.train.state import TrainState
from dist_lora.train.tracking import MetricsLog
from dist_lora.utils.stop_signals import Preempted, StopSignals


@dataclass(frozen=True)
class MetricsSources:
    """What a metrics record reads, besides the step's own outcome."""

    log_every: int
    samples_per_step: int  # batch size x ranks x accumulation
    data_stats: DataStats  # this rank's loader counters
    learning_rate: Callable[[], float]
    optimizer_name: str
    sum_across_ranks: Callable[[list[int]], list[int]]  # a collective
    comm: parallel.CommCounter | None = None
    trainable: tuple[nn.Parameter, ...] = ()


class MetricsHook:
    """One metrics record every ``logging.log_every`` steps, at the last step and at every skipped step.
    All ranks: the data counters are summed across ranks when a record is written."""

    name = "metrics"
    schedule = Schedule(every_steps=1, at_start=True)
    scope = Scope.ALL_RANKS

    def __init__(self, sources: MetricsSources, state: TrainState, metrics: MetricsLog) -> None:
        self.sources, self.state, self.metrics = sources, state, metrics
        self._step_started = time.perf_counter()
        self._recorded_step = 0  # the step of the last record: counters since then are per-step averages

    def run(self, ctx: HookContext) -> None:
        now = time.perf_counter()
        if ctx.moment is Moment.START:
            self._step_started = now
            self._recorded_step = ctx.step
            return
        src, state = self.sources, self.state
        if ctx.step % src.log_every == 0 or ctx.step == ctx.total_steps or not ctx.applied:
            elapsed = max(now - self._step_started, 1e-9)
            bad, padded = src.sum_across_ranks([src.data_stats.bad_records, src.data_stats.padded_samples])
            self.metrics.log(ctx.step, {"epoch": ctx.epoch, "loss": ctx.mean_loss, "lr": src.learning_rate(),
                                        "steps_per_s": 1.0 / elapsed, "samples_per_s": src.samples_per_step / elapsed,
                                        "skipped_steps": state.skipped_steps,
                                        "loss_scale_skips": state.loss_scale_skips,
                                        "data_bad_records": bad, "data_padded_samples": padded,
                                        "optimizer": src.optimizer_name,
                                        **self._comm_metrics(ctx.step - self._recorded_step),
                                        **_norm_metrics(ctx)})
            self._recorded_step = ctx.step
        self.metrics.advance()
        self._step_started = now

    def _comm_metrics(self, steps: int) -> dict[str, int]:
        """Bytes all-reduced per optimizer step, averaged over the ``steps`` since the last record."""
        src = self.sources
        if src.comm is None:
            return {}
        trainable = sum(p.numel() * p.element_size() for p in src.trainable)
        return {"allreduce_bytes": src.comm.take() // max(steps, 1), "trainable_bytes": trainable}


def _norm_metrics(ctx: HookContext) -> dict[str, float]:
    """training.scale_weight_norms at the last applied step, under kohya's names."""
    scaling = ctx.norm_scaling
    if scaling is None:
        return {}
    return {"keys_scaled": int(scaling.modules_scaled.item()), "average_key_norm": scaling.mean_norm.item(),
            "max_key_norm": scaling.max_norm.item()}


class CheckpointHook:
    """A checkpoint every ``checkpoint.every_steps`` steps and at the end (unless that step has one)."""

    name = "checkpoint"
    scope = Scope.ALL_RANKS

    def __init__(self, checkpointer: Checkpointer, every_steps: int) -> None:
        self.checkpointer = checkpointer
        self.schedule = Schedule(every_steps=every_steps, at_end=every_steps > 0)

    def run(self, ctx: HookContext) -> None:
        if ctx.moment is Moment.END and self.checkpointer.last_step == ctx.step:
            return
        self.checkpointer.save(ctx.step)
        ctx.checkpointed = True


class StopHook:
    """Stops the run on a checkpoint when a stop signal reached any rank, or at ``checkpoint.stop_at_step``.

    Both inputs agree on every rank: the stop flag went through the step's all-reduce, and stop_at_step
    is configuration. A signal that arrived while this step's checkpoint was written stops right here,
    on the checkpoint just made, instead of one step later (one more small all-reduce, on checkpoint
    steps only). The last step never stops: the run is complete."""

    name = "stop"
    schedule = EVERY_STEP
    scope = Scope.ALL_RANKS

    def __init__(self, checkpointer: Checkpointer, signals: StopSignals, stop_at_step: int,
                 any_rank: Callable[[bool], bool] = parallel.any_rank) -> None:
        self.checkpointer, self.signals, self.any_rank = checkpointer, signals, any_rank
        self.stop_at_step = stop_at_step

    def run(self, ctx: HookContext) -> None:
        step = ctx.step
        if step >= ctx.total_steps:
            return
        stop = ctx.stop_requested
        if ctx.checkpointed:
            stop = stop or self.any_rank(bool(self.signals.received))
        at_step = step == self.stop_at_step
        if not (stop or at_step):
            return
        reason = self.signals.received or ("checkpoint.stop_at_step" if at_step else "another rank was signalled")
        checkpointer = self.checkpointer
        folder = checkpointer.save(step) if checkpointer.last_step != step else checkpointer.folder_for(step)
        raise Preempted(step, str(folder), reason)
