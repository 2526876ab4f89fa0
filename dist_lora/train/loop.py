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
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from dist_lora import parallel
from dist_lora.adapters.max_norm import NormScaling, scale_weight_norms
from dist_lora.config import Config
from dist_lora.data.shards import Batch, ShardLoader
from dist_lora.train.guards import FaultInjection, NonFiniteRunError
from dist_lora.train.hooks import HookContext, HookRunner, Moment, StepHook
from dist_lora.train.optimizer_modes import to_training_point
from dist_lora.train.run_plan import RunPlan
from dist_lora.train.setup import Setup
from dist_lora.train.state import TrainState
from dist_lora.train.step import StepRunner
from dist_lora.train.tracking import SampleKeyLog
from dist_lora.utils.stop_signals import Preempted, StopSignals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutcome:
    mean_loss: float
    applied: bool
    scaler_skipped: bool  # an overflow the fp16 loss scaler handled (not a non-finite loss)
    stop_requested: bool  # a stop signal reached some rank


class TrainingLoop:
    """Runs the planned micro-batches from ``state`` on, calling ``hooks`` (in order) around the steps.

    It owns no resumable state of its own: the position and counters are ``state`` (a checkpoint part),
    and what a hook needs (checkpoints, metrics, stops) the hook was given when it was built."""

    def __init__(self, cfg: Config, setup: Setup, runner: StepRunner, accelerator: Accelerator,
                 world: parallel.World, loader: ShardLoader, plan: RunPlan, state: TrainState,
                 hooks: Sequence[StepHook], key_log: SampleKeyLog, signals: StopSignals,
                 resumed_from: str = "") -> None:
        self.cfg, self.setup, self.runner = cfg, setup, runner
        self.acc, self.world, self.loader = accelerator, world, loader
        self.plan, self.state, self.key_log, self.signals = plan, state, key_log, signals
        self.epoch_ends, self.total_steps = plan.epoch_ends, plan.total_steps
        self.resumed_from = resumed_from
        self.losses: list[float] = []  # of the steps this process applied
        self.norm_scaling: NormScaling | None = None  # of the last applied step, with training.scale_weight_norms
        self.faults = FaultInjection(world.rank)
        self._loss_sum: torch.Tensor | None = None  # this window's summed loss, on the device
        self._outcome = StepOutcome(float("nan"), True, False, False)
        self.accum = cfg.training.gradient_accumulation_steps
        self.hooks = HookRunner(list(hooks), world.is_main)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup.model.train()
        to_training_point(self.setup.optimizer)  # a checkpoint holds a schedule-free optimizer's average
        start_epoch, already = self.state.epoch, self.state.batch_in_epoch
        # A signal during start-up (loading, resume): every rank agrees, and the run stops before its first
        # step with nothing new to checkpoint.
        if self.state.step < self.total_steps and parallel.any_rank(bool(self.signals.received)):
            raise Preempted(self.state.step, self.resumed_from, self.signals.received or "another rank was signalled")
        self.hooks.run(self._context(Moment.START, start_epoch))
        for epoch in range(start_epoch, len(self.epoch_ends)):
            skip = already if epoch == start_epoch else 0
            progress = self.plan.resume if epoch == start_epoch else None
            first = skip if progress is not None else 0
            for index, batch in enumerate(self.loader.epoch(epoch, resume=progress), start=first):
                if index >= self.epoch_ends[epoch]:
                    break
                if index < skip:
                    continue  # consumed before the checkpoint (replayed: the checkpoint has no data position)
                synced = self._micro_step(batch, epoch, index)
                if synced:
                    self._end_of_step(epoch, epoch_finished=index + 1 == self.epoch_ends[epoch])
        self.hooks.run(self._context(Moment.END, self.state.epoch))

    def _context(self, moment: Moment, epoch: int, epoch_finished: bool = False) -> HookContext:
        outcome = self._outcome
        return HookContext(moment, self.state.step, epoch, self.total_steps, epoch_finished,
                           stop_requested=moment is Moment.STEP and outcome.stop_requested,
                           applied=outcome.applied, mean_loss=outcome.mean_loss, norm_scaling=self.norm_scaling)

    def _micro_step(self, batch: Batch, epoch: int, index: int) -> bool:
        s, state = self.setup, self.state
        if self.cfg.logging.record_sample_keys:
            self.key_log.write(epoch, state.micro_step, parallel.gather_to_all(batch.keys))
        with self.acc.accumulate(s.model):
            loss = self.runner.loss(batch, state.step, state.micro_step % self.accum)
            loss = self.faults.apply(loss, state.step + 1)
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
        state.micro_step += 1
        state.epoch, state.batch_in_epoch = epoch, index + 1
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
        st.step += 1
        step = st.step
        if outcome.applied:
            st.consecutive_skips = 0
            if cfg.training.scale_weight_norms > 0:
                # Before any hook: a checkpoint of this step holds the scaled weights.
                with parallel.editable_master_weights(self.acc, s.trainable_params):
                    self.norm_scaling = scale_weight_norms(parallel.unwrap(self.acc, s.model),
                                                         cfg.training.scale_weight_norms)
            self.losses.append(outcome.mean_loss)
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
