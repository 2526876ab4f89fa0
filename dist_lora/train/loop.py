"""The step loop: micro-batches, accumulation, the non-finite guard, checkpoints, resume and stops.

Every decision that changes control flow (skip a step, stop the run) is agreed across ranks with one
small all-reduce, so no rank ever waits in a collective that another rank skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_lora.config import Config
from dist_lora.data.shards import Batch, EpochProgress, ShardLoader
from dist_lora.train import parallel
from dist_lora.train.checkpoint import CheckpointManager, TrainPosition, resolve_resume
from dist_lora.train.guards import NanInjection, NonFiniteRunError, Preempted, StopSignals, gradients_finite
from dist_lora.train.tracking import MetricsLog, SampleKeyLog


@dataclass
class LoopState:
    position: TrainPosition = field(default_factory=lambda: TrainPosition(0, 0, 0, 0))
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    consecutive_skips: int = 0
    step_is_bad: bool = False
    accum_loss: float = 0.0
    last_checkpoint_step: int = -1
    resumed_from: str = ""


class TrainingLoop:
    def __init__(self, cfg: Config, run_dir: Path, setup: Any, runner: Any, accelerator: Any,
                 world: parallel.World, loader: ShardLoader, micro_per_epoch: list[int], total_steps: int,
                 metrics: MetricsLog, key_log: SampleKeyLog) -> None:
        self.cfg, self.run_dir, self.setup, self.runner = cfg, run_dir, setup, runner
        self.acc, self.world, self.loader = accelerator, world, loader
        self.micro_per_epoch, self.total_steps = micro_per_epoch, total_steps
        self.metrics, self.key_log = metrics, key_log
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
        self.state = LoopState()
        self.nan_injection = NanInjection(world.rank)
        self.accum = cfg.training.gradient_accumulation_steps
        self.resume_progress: EpochProgress | None = None

    # -- resume and checkpoints --------------------------------------------------------------------
    def resume(self) -> None:
        folder = resolve_resume(self.cfg.checkpoint.resume, self.run_dir)
        if folder is None:
            return
        s = self.setup
        self.state.position = CheckpointManager.load(folder, self.acc, s.model, s.optimizer, s.lr_scheduler,
                                                     parallel.unwrap(self.acc, s.model))
        self.state.last_checkpoint_step = self.state.position.step
        self.state.resumed_from = str(folder)
        saved = CheckpointManager.data_progress(folder, self.world.rank)
        self.resume_progress = EpochProgress.from_json(saved) if saved else None
        self.metrics.advance(self.state.position.step)

    def checkpoint(self) -> Path:
        s = self.setup
        folder = self.checkpoints.save(self.acc, s.model, s.optimizer, s.lr_scheduler,
                                       parallel.unwrap(self.acc, s.model), self.state.position,
                                       self.loader.progress.to_json())
        self.state.last_checkpoint_step = self.state.position.step
        return folder

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, signals: StopSignals) -> None:
        self.setup.model.train()
        start = self.state.position
        self._step_started = time.perf_counter()
        for epoch in range(start.epoch, len(self.micro_per_epoch)):
            already = start.batch_in_epoch if epoch == start.epoch else 0
            progress = self.resume_progress if epoch == start.epoch else None
            if progress is not None and not self.loader.can_resume(progress, epoch, already):
                # Another layout (ranks, workers, batch size, seed) than the stopped run: the sample order
                # differs anyway, so replay the epoch's start instead.
                progress = None
            first = already if progress is not None else 0
            for index, batch in enumerate(self.loader.epoch(epoch, resume=progress), start=first):
                if index == self.micro_per_epoch[epoch]:
                    break
                if index < already:
                    continue  # consumed before the checkpoint (replayed: the checkpoint has no data position)
                synced = self._micro_step(batch, epoch, index)
                if synced:
                    self._end_of_step(epoch, signals)
        if self.cfg.checkpoint.every_steps and self.state.last_checkpoint_step != self.state.position.step:
            self.checkpoint()

    def _micro_step(self, batch: Batch, epoch: int, index: int) -> bool:
        s, st = self.setup, self.state
        position = st.position
        if self.cfg.logging.record_sample_keys:
            self.key_log.write(epoch, position.micro_step, parallel.gather_to_all(batch.keys))
        with self.acc.accumulate(s.model):
            loss = self.runner.loss(batch, position.step, position.micro_step % self.accum)
            loss = self.nan_injection.apply(loss, position.step + 1)
            if parallel.all_ranks_any(self.acc, not bool(torch.isfinite(loss.detach()).all())):
                st.step_is_bad = True
            if not st.step_is_bad:
                self.acc.backward(loss)
            synced = self.acc.sync_gradients
            if synced and not st.step_is_bad and not parallel.uses_deepspeed(self.acc):
                # DeepSpeed steps inside backward(); there the loss check above is the guard.
                st.step_is_bad = parallel.all_ranks_any(self.acc, not gradients_finite(s.trainable_params))
            if synced and not st.step_is_bad:
                parallel.clip_gradients(self.acc, s.trainable_params, self.cfg.optimizer.max_grad_norm)
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        position.micro_step += 1
        position.epoch, position.batch_in_epoch = epoch, index + 1
        st.accum_loss += float(loss.detach().float().item()) / self.accum
        return synced

    def _end_of_step(self, epoch: int, signals: StopSignals) -> None:
        s, st, cfg = self.setup, self.state, self.cfg
        s.lr_scheduler.step()
        st.position.step += 1
        step = st.position.step
        bad, st.step_is_bad = st.step_is_bad, False
        mean_loss = parallel.mean_across_ranks(self.acc, torch.tensor(st.accum_loss))
        st.accum_loss = 0.0
        if bad:
            st.skipped_steps += 1
            st.consecutive_skips += 1
            if st.consecutive_skips >= cfg.training.max_consecutive_skips:
                raise NonFiniteRunError(
                    f"{st.consecutive_skips} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient and were skipped. Lower optimizer.lr, use training.mixed_precision = 'bf16' or 'no', "
                    f"check the data for broken images; the last checkpoint is intact.")
        else:
            st.consecutive_skips = 0
            st.losses.append(mean_loss)
        self._log(step, epoch, mean_loss, bad)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.checkpoint()
        if step < self.total_steps:
            self._maybe_stop(step, signals)

    def _maybe_stop(self, step: int, signals: StopSignals) -> None:
        reason = signals.received or ("checkpoint.stop_at_step" if step == self.cfg.checkpoint.stop_at_step else "")
        if not parallel.all_ranks_any(self.acc, bool(reason)):
            return
        folder = self.checkpoint() if self.state.last_checkpoint_step != step else \
            self.checkpoints.root / f"step-{step:08d}"
        raise Preempted(step, str(folder), reason or "another rank was signalled")

    def _comm_metrics(self) -> dict[str, int]:
        if self.setup.comm is None:
            return {}
        trainable = sum(p.numel() * p.element_size() for p in self.setup.trainable_params)
        return {"allreduce_bytes": self.setup.comm.take(), "trainable_bytes": trainable}

    def _log(self, step: int, epoch: int, mean_loss: float, skipped: bool) -> None:
        now = time.perf_counter()
        if step % self.cfg.logging.log_every == 0 or step == self.total_steps or skipped:
            elapsed = max(now - self._step_started, 1e-9)
            samples = self.cfg.training.batch_size * self.world.size * self.accum
            stats = self.loader.stats
            bad, padded = parallel.sum_across_ranks(self.acc, [stats.bad_records, stats.padded_samples])
            self.metrics.log(step, {"epoch": epoch, "loss": mean_loss,
                                    "lr": self.setup.lr_scheduler.get_last_lr()[0],
                                    "steps_per_s": 1.0 / elapsed, "samples_per_s": samples / elapsed,
                                    "skipped_steps": self.state.skipped_steps,
                                    "data_bad_records": bad, "data_padded_samples": padded,
                                    "optimizer": self.setup.optimizer_choice.used, **self._comm_metrics()})
        self.metrics.advance()
        self._step_started = now
