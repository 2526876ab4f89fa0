"""The step loop: micro-batches, accumulation, the non-finite guard, checkpoints, resume and stops.

Host synchronisation budget: each optimizer step makes one small all-reduce and one device-to-host read
(a 3-value tensor: the summed loss, a "gradients not finite" flag taken from the norm that clipping
computes, and a stop request). Every control-flow decision (skip the update, stop the run) is taken from
that one reduced tensor, so no rank waits in a collective that another rank skipped, and nothing else in
the step waits for the GPU. The loss stays on the device until then.

Non-finite values:
- bf16 / fp32: a step whose loss or gradient norm is not finite on any rank is skipped on every rank.
- fp16: the loss scaler owns overflow. Gradients are unscaled before clipping, the scaler skips the update
  and halves its scale; those skips are counted (``loss_scale_skips``). The loop itself skips a step only
  for a non-finite loss, which no scale cures.
- DeepSpeed: the engine steps inside backward() and skips a non-finite step itself (clearing its
  gradient buffers, so nothing leaks into the next accumulation window); the loop counts it.
A skipped step still counts as a step: the position, the keyed noise and the LR schedule all advance, on
every path alike, so the schedule ends with max_steps however many steps overflowed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator

from dist_lora import parallel
from dist_lora.adapters.max_norm import NormScaling, scale_weight_norms
from dist_lora.config import Config
from dist_lora.data.shards import Batch, EpochProgress, ShardLoader
from dist_lora.train.checkpoint import CheckpointManager, TrainPosition
from dist_lora.train.guards import FaultInjection, NonFiniteRunError
from dist_lora.train.hooks import HookContext, HookRunner, Moment, StepHook
from dist_lora.train.loop_hooks import CheckpointHook, MetricsHook, StopHook
from dist_lora.train.run_plan import ResumePoint, RunPlan
from dist_lora.train.setup import Setup
from dist_lora.train.step import StepRunner
from dist_lora.train.tracking import MetricsLog, SampleKeyLog
from dist_lora.utils.stop_signals import Preempted, StopSignals

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    position: TrainPosition = field(default_factory=lambda: TrainPosition(0, 0, 0, 0))
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # updates not applied, for any reason
    loss_scale_skips: int = 0  # of which the fp16 loss scaler skipped for an overflow
    consecutive_skips: int = 0
    last_checkpoint_step: int = -1
    resumed_from: str = ""
    first_loss: float | None = None  # of the whole run, carried across resumes
    norm_scaling: NormScaling | None = None  # of the last applied step, with training.scale_weight_norms
    resumes: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutcome:
    mean_loss: float
    applied: bool
    scaler_skipped: bool  # an overflow the fp16 loss scaler handled (not a non-finite loss)
    stop_requested: bool  # a stop signal reached some rank


class TrainingLoop:
    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, runner: StepRunner, accelerator: Accelerator,
                 world: parallel.World, loader: ShardLoader, plan: RunPlan, metrics: MetricsLog,
                 key_log: SampleKeyLog, hooks: Sequence[StepHook] = ()) -> None:
        self.cfg, self.run_dir, self.setup, self.runner = cfg, run_dir, setup, runner
        self.acc, self.world, self.loader = accelerator, world, loader
        self.epoch_ends, self.total_steps = plan.epoch_ends, plan.total_steps
        self.metrics, self.key_log = metrics, key_log
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
        self.state = LoopState()
        self.faults = FaultInjection(world.rank)
        self.signals = StopSignals()
        self._loss_sum: torch.Tensor | None = None  # this window's summed loss, on the device
        self._outcome = StepOutcome(float("nan"), True, False, False)
        self.accum = cfg.training.gradient_accumulation_steps
        self.resume_progress: EpochProgress | None = None
        # In order: metrics, checkpoints, the given hooks (sampling, ...), then the stop check (which stops on
        # a checkpoint just made).
        self.hooks = HookRunner([MetricsHook(self), CheckpointHook(self), *hooks, StopHook(self)], world.is_main)

    # -- resume and checkpoints --------------------------------------------------------------------
    def resume(self, point: ResumePoint | None) -> None:
        if point is None:
            self.metrics.truncate_after(0)
            self.key_log.truncate_from(0)
            return
        s, folder = self.setup, point.folder
        position = CheckpointManager.load(folder, self.acc, s.model, s.optimizer, s.lr_scheduler,
                                          parallel.unwrap(self.acc, s.model))
        if s.ema is not None and not s.ema.load(folder):
            log.warning("checkpoint '%s' holds no weight average: ema starts again from the resumed weights", folder)
        self.key_log.truncate_from(position.micro_step)
        # In this layout's terms: its index into the resumed epoch, and micro-steps counted with this run's
        # accumulation (a checkpoint is always at a step boundary).
        position.batch_in_epoch = point.first_batch
        position.micro_step = position.step * self.accum
        self.state.position = position
        self.state.last_checkpoint_step = position.step
        self.state.resumed_from = str(folder)
        self.resume_progress = point.progress
        history = CheckpointManager.run_state(folder)
        self.state.first_loss = history.get("first_loss")
        self.state.resumes = [*history.get("resumes", []),
                              {"step": self.state.position.step, "checkpoint": str(folder),
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
        self.metrics.truncate_after(self.state.position.step)
        self.metrics.advance(self.state.position.step)

    def checkpoint(self) -> Path:
        s = self.setup
        folder = self.checkpoints.save(self.acc, s.model, s.optimizer, s.lr_scheduler,
                                       parallel.unwrap(self.acc, s.model), self.state.position, s.ema,
                                       self.loader.progress.to_json(),
                                       {"first_loss": self.state.first_loss, "resumes": self.state.resumes})
        self.state.last_checkpoint_step = self.state.position.step
        return folder

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, signals: StopSignals) -> None:
        self.signals = signals
        self.setup.model.train()
        start = replace(self.state.position)
        # A signal during start-up (loading, resume): every rank agrees, and the run stops before its first
        # step with nothing new to checkpoint.
        if start.step < self.total_steps and parallel.any_rank(bool(signals.received)):
            latest = self.state.resumed_from
            raise Preempted(start.step, latest, signals.received or "another rank was signalled")
        self.hooks.run(self._context(Moment.START, start.epoch))
        for epoch in range(start.epoch, len(self.epoch_ends)):
            already = start.batch_in_epoch if epoch == start.epoch else 0
            progress = self.resume_progress if epoch == start.epoch else None
            first = already if progress is not None else 0
            for index, batch in enumerate(self.loader.epoch(epoch, resume=progress), start=first):
                if index >= self.epoch_ends[epoch]:
                    break
                if index < already:
                    continue  # consumed before the checkpoint (replayed: the checkpoint has no data position)
                synced = self._micro_step(batch, epoch, index)
                if synced:
                    self._end_of_step(epoch, epoch_finished=index + 1 == self.epoch_ends[epoch])
        self.hooks.run(self._context(Moment.END, self.state.position.epoch))

    def _context(self, moment: Moment, epoch: int, epoch_finished: bool = False) -> HookContext:
        outcome = self._outcome
        return HookContext(moment, self.state.position.step, epoch, self.total_steps, epoch_finished,
                           stop_requested=moment is Moment.STEP and outcome.stop_requested,
                           applied=outcome.applied, mean_loss=outcome.mean_loss)

    def _micro_step(self, batch: Batch, epoch: int, index: int) -> bool:
        s, st = self.setup, self.state
        position = st.position
        if self.cfg.logging.record_sample_keys:
            self.key_log.write(epoch, position.micro_step, parallel.gather_to_all(batch.keys))
        with self.acc.accumulate(s.model):
            loss = self.runner.loss(batch, position.step, position.micro_step % self.accum)
            loss = self.faults.apply(loss, position.step + 1)
            # Always backward, even a non-finite loss: under DDP every rank must join the gradient
            # all-reduce, and DeepSpeed's micro-step counter must stay aligned with ours. Its gradients
            # are discarded below.
            self.acc.backward(loss)
            detached = loss.detach().float()
            self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
            synced = self.acc.sync_gradients
            if synced:
                self._outcome = self._optimizer_step()
            s.optimizer.zero_grad(set_to_none=True)
        position.micro_step += 1
        position.epoch, position.batch_in_epoch = epoch, index + 1
        return synced

    def _optimizer_step(self) -> StepOutcome:
        """At the end of an accumulation window: one all-reduce and one read decide the update."""
        s = self.setup
        assert self._loss_sum is not None
        device = self._loss_sum.device
        grads_bad = parallel.nonfinite_gradient_flag(self.acc, s.trainable_params, self.cfg.optimizer.max_grad_norm,
                                                     device)
        stop = torch.tensor(1.0 if self.signals.received else 0.0).to(device, non_blocking=True)
        local = torch.stack([self._loss_sum, grads_bad, stop])
        self._loss_sum = None
        loss_sum, grads_bad_count, stop_count = parallel.sum_tensor_across_ranks(self.acc, local).tolist()
        loss_ok = math.isfinite(loss_sum)
        applied = parallel.finish_step(self.acc, s.model, s.optimizer, loss_finite=loss_ok,
                                       gradients_finite=grads_bad_count == 0)
        return StepOutcome(loss_sum / (self.world.size * self.accum), applied,
                           scaler_skipped=not applied and loss_ok and parallel.loss_scaling(self.acc),
                           stop_requested=stop_count > 0)

    def _end_of_step(self, epoch: int, epoch_finished: bool = False) -> None:
        s, st, cfg = self.setup, self.state, self.cfg
        outcome = self._outcome
        s.lr_scheduler.step()
        st.position.step += 1
        step = st.position.step
        if outcome.applied:
            st.consecutive_skips = 0
            if cfg.training.scale_weight_norms > 0:
                # Before any hook: a checkpoint of this step holds the scaled weights.
                with parallel.editable_master_weights(self.acc, s.trainable_params):
                    st.norm_scaling = scale_weight_norms(parallel.unwrap(self.acc, s.model),
                                                         cfg.training.scale_weight_norms)
            st.losses.append(outcome.mean_loss)
            if st.first_loss is None:
                st.first_loss = outcome.mean_loss
        else:
            st.skipped_steps += 1
            st.loss_scale_skips += int(outcome.scaler_skipped)
            # Overflows are the loss scaler's to cure by backing off; they count toward a stop only once
            # the scale has fallen below 1, where backing off no longer helps.
            scale = parallel.loss_scale(self.acc, s.model) if outcome.scaler_skipped else None
            if scale is None or scale < 1.0:
                st.consecutive_skips += 1
            if st.consecutive_skips >= cfg.training.max_consecutive_skips:
                raise NonFiniteRunError(
                    f"{st.consecutive_skips} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient and were skipped. Lower optimizer.lr, use training.mixed_precision = 'bf16' or 'no', "
                    f"check the data for broken images; the last checkpoint is intact.")
        if s.ema is not None and s.ema.due(step):
            # Before the hooks: a checkpoint of this step holds this average.
            with parallel.master_weights(self.acc, s.trainable_params):
                s.ema.update()
        self.hooks.run(self._context(Moment.STEP, epoch, epoch_finished))
