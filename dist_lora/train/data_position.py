"""The data loader's position as a per-rank checkpoint part."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dist_lora.data.position import EpochProgress
from dist_lora.data.shards import ShardLoader
from dist_lora.train.checkpoint_format import SavedRanks
from dist_lora.train.state import TrainState

log = logging.getLogger(__name__)


class DataPosition:
    """Where this rank's loader stands in the current epoch. Loaded after the train state (it needs the
    epoch and batch the checkpoint was taken at): ``resume`` is then where the loader continues.

    On the same layout (ranks, workers, batch size, seed, accumulation) a rank reads its own file and
    continues bit for bit. On another layout it reads every old rank's file and starts at the stopped
    run's sample position: what any old rank used is left out and the new ranks share out the rest.
    ``resume`` None: the epoch is replayed from its start (a checkpoint without a data position)."""

    def __init__(self, loader: ShardLoader, state: TrainState) -> None:
        self.loader, self.state = loader, state
        self.resume: EpochProgress | None = None
        self.inherited: dict[str, Any] = {}  # what an earlier layout used this epoch (loaded before this part)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.progress.rank_json()

    def load_rank_states(self, saved: SavedRanks) -> None:
        loader, epoch = self.loader, self.state.epoch
        own = saved.own()
        if own is not None and "workers" in own:
            progress = EpochProgress.from_json({**own, "inherited": self.inherited})
            if loader.can_resume(progress, epoch, self.state.batch_in_epoch):
                self.resume = progress
                return
        every = [{**state, "inherited": self.inherited} if state and "workers" in state else state
                 for state in saved.every()]
        self.resume = loader.continuation(every, epoch, self.state.batch_in_epoch)
        if loader.rank != 0:
            return
        if self.resume is None:
            log.warning("the checkpoint holds no sample position usable by this layout of ranks; epoch %d is "
                        "replayed from its start", epoch)
        else:
            used = sum(self.resume.inherited.counts(loader.manifest).values())
            left = loader.manifest.num_samples_with_repeats - used
            log.info("resuming epoch %d on another layout (%d rank(s), was %d) at the stopped run's sample "
                     "position: %d sample(s) left", epoch, loader.world_size, saved.world_size, left)

    def missing(self, folder: Path) -> None:
        self.resume = None
        if self.loader.rank == 0:
            log.warning("checkpoint '%s' holds no data position; epoch %d is replayed from its start", folder,
                        self.state.epoch)

    @property
    def first_batch(self) -> int:
        """This layout's index of the first micro-batch the resumed epoch still takes."""
        return self.resume.batches if self.resume is not None else self.state.batch_in_epoch


class InheritedEntries:
    """The entries an earlier layout of ranks used in the current epoch: the same on every rank, so the main
    rank writes it once (MAIN_JSON) and every rank reads it before its own data position."""

    def __init__(self, position: DataPosition) -> None:
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        return self.position.loader.progress.inherited.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.inherited = dict(state)

    def missing(self, folder: Path) -> None:
        self.position.inherited = {}  # format 1: its positions name their samples themselves
