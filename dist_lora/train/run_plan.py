"""Which micro-batches a run takes: where it starts (fresh, or a checkpoint) and how many it runs per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dist_lora.config import Config
from dist_lora.data.position import EpochProgress
from dist_lora.data.shards import ShardLoader
from dist_lora.train.checkpoint import Checkpointer
from dist_lora.train.data_position import DataPosition
from dist_lora.train.state import TrainState

# Loaded before the model is built: the run's length (and with it the LR schedule) depends on them.
POSITION_PARTS = ("train_state", "data_inherited", "data_position")


@dataclass(frozen=True)
class ResumedAt:
    folder: Path
    micro_step: int  # as the stopped run counted it (its accumulation), for truncating its logs


def restore_position(checkpointer: Checkpointer, folder: Path | None, state: TrainState, data: DataPosition,
                     accumulation: int) -> ResumedAt | None:
    """Loads the train state and data position of ``folder`` (None: a fresh start) and puts the position
    in this layout's terms: its index into the resumed epoch, and micro-steps counted with this run's
    accumulation (a checkpoint is always at a step boundary)."""
    if folder is None:
        return None
    checkpointer.load(folder, POSITION_PARTS)
    resumed = ResumedAt(folder, state.micro_step)
    state.batch_in_epoch = data.first_batch
    state.micro_step = state.step * accumulation
    state.resumes.append({"step": state.step, "checkpoint": str(folder),
                          "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return resumed


@dataclass(frozen=True)
class RunPlan:
    total_steps: int  # optimizer steps at the end of the run
    epoch_ends: list[int]  # per epoch, the micro-batch index (in this layout) where the run leaves it
    resume: EpochProgress | None = None  # where the loader continues the first epoch; None: from its start


def plan_run(cfg: Config, loader: ShardLoader, start: TrainState, resume: EpochProgress | None = None) -> RunPlan:
    """Steps and per-epoch micro-batches from ``start`` on; every count is a multiple of accumulation."""
    accum = cfg.training.gradient_accumulation_steps
    max_steps, epochs = cfg.training.max_steps, cfg.training.epochs
    epoch, total, first = start.epoch, start.step, start.batch_in_epoch
    progress = resume
    ends = [0] * epoch  # epochs before the start are done
    while True:
        micro = loader.plan(epoch, progress).steps  # planned as a multiple of accum, padded where needed
        first = min(first, micro)
        end = max(first, min(micro, first + (max_steps - total) * accum)) if max_steps else micro
        ends.append(end)
        total += (end - first) // accum
        if (total >= max_steps) if max_steps else (len(ends) >= epochs):
            return RunPlan(total, ends, resume)
        epoch, first, progress = epoch + 1, 0, None
