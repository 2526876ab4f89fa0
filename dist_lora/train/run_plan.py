"""Which micro-batches a run takes: where it starts (fresh, or a checkpoint) and how many it runs per epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dist_lora.config import Config
from dist_lora.data.shards import EpochProgress, ShardLoader
from dist_lora.train.checkpoint import CheckpointManager, TrainPosition, resolve_resume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    position: TrainPosition
    # Where this rank's loader continues the stopped epoch (its own position, or the stopped run's sample
    # position shared out anew on another layout); None: the epoch is replayed from its start.
    progress: EpochProgress | None

    @property
    def first_batch(self) -> int:
        """This layout's index of the first micro-batch the resumed epoch still takes."""
        return self.progress.batches if self.progress is not None else self.position.batch_in_epoch


def find_resume_point(cfg: Config, run_dir: Path, loader: ShardLoader) -> ResumePoint | None:
    folder = resolve_resume(cfg.checkpoint.resume, run_dir)
    if folder is None:
        return None
    position = CheckpointManager.position(folder)
    saved = CheckpointManager.all_data_progress(folder)
    progress = loader.continuation(saved, position.epoch, position.batch_in_epoch)
    if loader.rank == 0:
        if progress is None:
            log.warning("checkpoint '%s' holds no sample position usable by this layout of ranks; epoch %d is "
                        "replayed from its start", folder, position.epoch)
        elif progress.batches == 0 and progress.used:
            left = loader.manifest.num_samples_with_repeats - sum(len(k) for k in progress.used.values())
            log.info("resuming epoch %d on another layout (%d rank(s), was %s) at the stopped run's sample "
                     "position: %d sample(s) left", position.epoch, loader.world_size,
                     (saved[0] or {}).get("layout", ["?"])[0], left)
    return ResumePoint(folder, position, progress)


@dataclass(frozen=True)
class RunPlan:
    total_steps: int  # optimizer steps at the end of the run
    epoch_ends: list[int]  # per epoch, the micro-batch index (in this layout) where the run leaves it


def plan_run(cfg: Config, loader: ShardLoader, start: ResumePoint | None = None) -> RunPlan:
    """Steps and per-epoch micro-batches from ``start`` on; every count is a multiple of accumulation."""
    accum = cfg.training.gradient_accumulation_steps
    max_steps, epochs = cfg.training.max_steps, cfg.training.epochs
    epoch = start.position.epoch if start else 0
    total = start.position.step if start else 0
    progress = start.progress if start else None
    first = start.first_batch if start else 0
    ends = [0] * epoch  # epochs before the start are done
    while True:
        micro = loader.plan(epoch, progress).steps  # planned as a multiple of accum, padded where needed
        first = min(first, micro)
        end = max(first, min(micro, first + (max_steps - total) * accum)) if max_steps else micro
        ends.append(end)
        total += (end - first) // accum
        if (total >= max_steps) if max_steps else (len(ends) >= epochs):
            return RunPlan(total, ends)
        epoch, first, progress = epoch + 1, 0, None
