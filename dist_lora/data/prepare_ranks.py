"""`dist-lora prepare` over several processes (``accelerate launch``, ``torchrun`` or ``srun`` tasks): who
does what, and how a failure on one process stops them all instead of leaving the others waiting.

Every process encodes its slice into its own folder of a shared staging folder; the main process then
merges them into one dataset and puts it in place. The output folder must therefore be on a file system
all processes see (as the training's shards are)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dist_lora import parallel
from dist_lora.data.kohya import DatasetFolderError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int

    @classmethod
    def current(cls) -> Ranks:
        """This process's place; a process group is set up only when the launch has several processes."""
        parallel.adopt_slurm_tasks()
        if parallel.launched_world_size() <= 1:
            return cls(0, 1)
        world = parallel.process_world()
        return cls(world.rank, world.size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, count: int) -> list[int]:
        """The indices (of ``count`` items) this process takes: every size-th, from its rank."""
        return list(range(self.rank, count, self.size))

    def everywhere(self, work: Callable[[], T]) -> T:
        """``work`` on every process; when it fails on any, every process raises (naming the failing rank)."""
        if self.size == 1:
            return work()
        own: BaseException | None = None
        result: Any = None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
            own = exc
        failures = parallel.gather_to_all(None if own is None else f"{type(own).__name__}: {own}")
        if own is not None:
            raise own
        failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
        if failed:
            rank, message = failed[0]
            raise DatasetFolderError(f"prepare failed on process {rank} of {self.size}: {message}")
        return result  # type: ignore[no-any-return]

    def from_main(self, work: Callable[[], T]) -> T:
        """``work`` on the main process only; its result (or its failure) on every process."""
        if self.size == 1:
            return work()
        result: Any = None
        message = None
        if self.is_main:
            try:
                result = work()
            except Exception as exc:
                parallel.gather_to_all((None, f"{type(exc).__name__}: {exc}"))
                raise
        result, message = parallel.gather_to_all((result, None) if self.is_main else None)[0]
        if message is not None:
            raise DatasetFolderError(f"prepare failed on the main process: {message}")
        return result  # type: ignore[no-any-return]


def check_shared(staging: Path, ranks: Ranks) -> None:
    if not staging.is_dir():
        raise DatasetFolderError(f"process {ranks.rank} does not see the staging folder '{staging}' the main process "
                                 f"made beside the output: prepare over several nodes needs the output folder on a "
                                 f"file system every node shares.")
