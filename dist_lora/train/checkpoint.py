"""Crash-safe training checkpoints of named resumable parts.

The checkpointer knows nothing of what it saves: each part is registered under a name with how it is
stored, and is a Stateful (``state_dict()`` / ``load_state_dict()``), a per-rank Stateful
(``load_rank_states()``, each rank writing its own file) or a folder writer (``save_to()`` /
``load_from()``, for state written by a library, such as a DeepSpeed engine's partitions).

A checkpoint is a folder ``checkpoints/step-00000040`` written into a temporary folder, flushed,
renamed, and only then marked complete by ``COMPLETE``; older checkpoints are pruned only after that.
``resume = "latest"`` ignores anything unmarked, so a process killed mid-write leaves the previous
checkpoint as the one to resume from. No state is gathered to every rank: per-rank parts are one file
per rank, and a resume on the same layout reads its own file only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_lora.train.checkpoint_format import (
    COMPLETE,
    FORMAT,
    FORMAT_FILE,
    RANKS_DIR,
    CheckpointError,
    CheckpointReader,
    SavedRanks,
    Storage,
    main_file,
    rank_file,
    write_tensors,
)
from dist_lora.train.checkpoint_v1 import FormatOneReader, is_format_one
from dist_lora.utils.files import write_text_atomic
from dist_lora.utils.stop_signals import signal_hook

_PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointWorld:
    """The process group as the checkpointer needs it: no collective beyond a barrier."""

    rank: int
    size: int
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Registered:
    part: Any
    storage: Storage
    optional: bool  # a checkpoint without it resumes; the part's ``missing()`` is called


def open_checkpoint(folder: Path) -> CheckpointReader:
    if (folder / FORMAT_FILE).is_file():
        reader = CheckpointReader(folder)
        if reader.format != FORMAT:
            raise CheckpointError(f"checkpoint '{folder}' is in checkpoint format {reader.format}; this version of "
                                  f"dist_lora reads formats 1 and {FORMAT}. Resume it with the dist_lora version "
                                  f"that wrote it.")
        return reader
    if is_format_one(folder):
        return FormatOneReader(folder)
    raise CheckpointError(f"'{folder}' is marked {COMPLETE} but holds neither {FORMAT_FILE} nor a format-1 "
                          f"position.json; it is not a dist_lora checkpoint.")


# -- the manager ------------------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """``""``: start fresh; ``"latest"``: newest complete checkpoint of this run (None if there is none);
    otherwise a checkpoint folder, which must be complete."""
    if not spec:
        return None
    if spec == "latest":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint.resume '{path}' is not a complete checkpoint folder (no {COMPLETE} "
                              f"marker); use 'latest' or a folder like {run_dir / 'checkpoints' / 'step-00000100'}.")
    return path


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


class Checkpointer:
    """Saves and loads the registered parts, in registration order, on every rank alike."""

    def __init__(self, run_dir: Path, keep: int, world: CheckpointWorld) -> None:
        self.root = run_dir / "checkpoints"
        self.keep, self.world = keep, world
        self.parts: dict[str, _Registered] = {}
        self.last_step = -1  # the step of the newest checkpoint this run wrote or resumed from
        self.loaded_from: Path | None = None
        # Entered around every save: the parts are taken at the weights the run is evaluated at (a
        # schedule-free optimizer's average).
        self.around_save: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def register(self, name: str, part: Any, storage: Storage, optional: bool = False) -> None:
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} is registered twice")
        self.parts[name] = _Registered(part, storage, optional)

    def folder_for(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:08d}"

    def save(self, step: int) -> Path:
        """Collective: every rank calls it, with the same parts. Returns the completed folder."""
        with self.around_save():
            return self._save(step)

    def _save(self, step: int) -> Path:
        final = self.folder_for(step)
        staging = self.root / f".tmp-{final.name}"
        world = self.world
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / RANKS_DIR).mkdir(parents=True)
        world.barrier()
        # Every rank takes every part's state in the same order: a part may gather (ZeRO-3 weights).
        for name, entry in self.parts.items():
            self._save_part(name, entry, staging)
        own = list((staging / RANKS_DIR).glob(f"*-rank{world.rank:05d}.*"))
        _fsync_files(own)
        world.barrier()
        signal_hook(f"checkpoint:{step}")
        if world.is_main:
            _crash_hook(step)
            info = {"format": FORMAT, "step": step, "world_size": world.size,
                    "parts": {name: entry.storage.value for name, entry in self.parts.items()}}
            (staging / FORMAT_FILE).write_text(json.dumps(info))
            _fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of an earlier crash
            staging.rename(final)
            write_text_atomic(final / COMPLETE, json.dumps({"step": step}))
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old)
        world.barrier()
        self.last_step = step
        return final

    def _save_part(self, name: str, entry: _Registered, staging: Path) -> None:
        storage, part, world = entry.storage, entry.part, self.world
        if storage is Storage.FOLDER:
            part.save_to(staging)
            return
        state = part.state_dict()
        if storage.per_rank:
            path = staging / rank_file(name, storage, world.rank)
            if storage is Storage.RANK_JSON:
                path.write_text(json.dumps(state, ensure_ascii=False))
            else:
                write_tensors(state, path)
            return
        if not world.is_main:
            return
        path = staging / main_file(name, storage)
        if storage is Storage.MAIN_JSON:
            path.write_text(json.dumps(state, ensure_ascii=False))
        elif storage is Storage.MAIN_TENSORS:
            write_tensors(state, path)
        else:
            torch.save(state, path)

    def load(self, folder: Path, names: Iterable[str] | None = None) -> None:
        """Loads the named registered parts (all of them by default), in registration order."""
        reader = open_checkpoint(folder)
        wanted = set(self.parts) if names is None else set(names)
        unknown = wanted - set(self.parts)
        if unknown:
            raise ValueError(f"no checkpoint part registered as {sorted(unknown)}")
        for name, entry in self.parts.items():
            if name not in wanted:
                continue
            if not reader.has(name):
                if not entry.optional:
                    raise CheckpointError(f"checkpoint '{folder}' holds no {name!r} state, which this run needs "
                                          f"(it holds {sorted(reader.parts)}); resume from a checkpoint of this run.")
                entry.part.missing(folder)
                continue
            try:
                self._load_part(name, entry, reader)
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint '{folder}', part {name!r}: {exc}") from exc
        self.last_step = reader.step
        self.loaded_from = folder

    def _load_part(self, name: str, entry: _Registered, reader: CheckpointReader) -> None:
        storage, part = entry.storage, entry.part
        if storage is Storage.FOLDER:
            part.load_from(reader.folder)
        elif storage.per_rank:
            part.load_rank_states(SavedRanks(reader, name, storage, self.world.rank))
        else:
            part.load_state_dict(reader.read(name, storage))


def _fsync_files(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _crash_hook(step: int) -> None:
    """Test hook: ``DIST_LORA_KILL_DURING_CHECKPOINT=STEP`` SIGKILLs the main process half-way through
    writing that step's checkpoint, to prove a crash there loses nothing."""
    if os.environ.get("DIST_LORA_KILL_DURING_CHECKPOINT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
