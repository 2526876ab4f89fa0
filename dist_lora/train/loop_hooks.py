"""The training loop's built-in step hooks: metrics, checkpoints and the stop check."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dist_lora import parallel
from dist_lora.train.hooks import EVERY_STEP, HookContext, Moment, Schedule, Scope
from dist_lora.utils.stop_signals import Preempted

if TYPE_CHECKING:
    from dist_lora.train.loop import TrainingLoop


class MetricsHook:
    """One metrics record every ``logging.log_every`` steps, at the last step and at every skipped step.
    All ranks: the data counters are summed across ranks when a record is written."""

    name = "metrics"
    schedule = Schedule(every_steps=1, at_start=True)
    scope = Scope.ALL_RANKS

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop
        self._step_started = time.perf_counter()
        self._recorded_step = 0  # the step of the last record: counters since then are per-step averages

    def run(self, ctx: HookContext) -> None:
        now = time.perf_counter()
        if ctx.moment is Moment.START:
            self._step_started = now
            self._recorded_step = ctx.step
            return
        loop, cfg = self.loop, self.loop.cfg
        if ctx.step % cfg.logging.log_every == 0 or ctx.step == ctx.total_steps or not ctx.applied:
            elapsed = max(now - self._step_started, 1e-9)
            samples = cfg.training.batch_size * loop.world.size * loop.accum
            stats = loop.loader.stats
            bad, padded = parallel.sum_across_ranks(loop.acc, [stats.bad_records, stats.padded_samples])
            setup, state = loop.setup, loop.state
            loop.metrics.log(ctx.step, {"epoch": ctx.epoch, "loss": ctx.mean_loss,
                                        "lr": setup.lr_scheduler.get_last_lr()[0],
                                        "steps_per_s": 1.0 / elapsed, "samples_per_s": samples / elapsed,
                                        "skipped_steps": state.skipped_steps,
                                        "loss_scale_skips": state.loss_scale_skips,
                                        "data_bad_records": bad, "data_padded_samples": padded,
                                        "optimizer": setup.optimizer_choice.used,
                                        **self._comm_metrics(ctx.step - self._recorded_step),
                                        **self._norm_metrics()})
            self._recorded_step = ctx.step
        loop.metrics.advance()
        self._step_started = now

    def _norm_metrics(self) -> dict[str, float]:
        """training.scale_weight_norms at the last applied step, under kohya's names."""
        scaling = self.loop.state.norm_scaling
        if scaling is None:
            return {}
        return {"keys_scaled": int(scaling.modules_scaled.item()), "average_key_norm": scaling.mean_norm.item(),
                "max_key_norm": scaling.max_norm.item()}

    def _comm_metrics(self, steps: int) -> dict[str, int]:
        """Bytes all-reduced per optimizer step, averaged over the ``steps`` since the last record."""
        setup = self.loop.setup
        if setup.comm is None:
            return {}
        trainable = sum(p.numel() * p.element_size() for p in setup.trainable_params)
        return {"allreduce_bytes": setup.comm.take() // max(steps, 1), "trainable_bytes": trainable}


class CheckpointHook:
    """A checkpoint every ``checkpoint.every_steps`` steps and at the end (unless that step has one)."""

    name = "checkpoint"
    scope = Scope.ALL_RANKS

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop
        every = loop.cfg.checkpoint.every_steps
        self.schedule = Schedule(every_steps=every, at_end=every > 0)

    def run(self, ctx: HookContext) -> None:
        if ctx.moment is Moment.END and self.loop.state.last_checkpoint_step == ctx.step:
            return
        self.loop.checkpoint()
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

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop

    def run(self, ctx: HookContext) -> None:
        loop, step = self.loop, ctx.step
        if step >= ctx.total_steps:
            return
        stop = ctx.stop_requested
        if ctx.checkpointed:
            stop = stop or parallel.any_rank(bool(loop.signals.received))
        at_step = step == loop.cfg.checkpoint.stop_at_step
        if not (stop or at_step):
            return
        reason = loop.signals.received or ("checkpoint.stop_at_step" if at_step else "another rank was signalled")
        folder = loop.checkpoint() if loop.state.last_checkpoint_step != step else \
            loop.checkpoints.root / f"step-{step:08d}"
        raise Preempted(step, str(folder), reason)
