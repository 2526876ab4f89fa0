"""The data loader's position as a per-rank checkpoint part."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dist_lora.data.shards import EpochProgress, ShardLoader
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

    def state_dict(self) -> dict[str, Any]:
        return self.loader.progress.to_json()

    def load_rank_states(self, saved: SavedRanks) -> None:
        loader, epoch = self.loader, self.state.epoch
        own = saved.own()
        if own is not None:
            progress = EpochProgress.from_json(own)
            if loader.can_resume(progress, epoch, self.state.batch_in_epoch):
                self.resume = progress
                return
        self.resume = loader.continuation(saved.every(), epoch, self.state.batch_in_epoch)
        if loader.rank != 0:
            return
        if self.resume is None:
            log.warning("the checkpoint holds no sample position usable by this layout of ranks; epoch %d is "
                        "replayed from its start", epoch)
        else:
            left = loader.manifest.num_samples_with_repeats - sum(len(k) for k in self.resume.used.values())
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
