"""The checkpoint folder format: how each kind of part is stored, and reading a folder back."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_lora.errors import DistLoraError

COMPLETE = "COMPLETE"
FORMAT_FILE = "checkpoint.json"  # the format version, the step, the world size and the parts it holds
FORMAT = 2  # 1: the layout before named parts (position.json, data_progress.json, ...), still read
RANKS_DIR = "ranks"


class CheckpointError(DistLoraError):
    """A checkpoint to resume from is missing or unusable."""


class Storage(Enum):
    """How a part is stored. MAIN: the main rank's state, one file; RANK: every rank's own, one file each."""

    MAIN_JSON = "main-json"  # <name>.json
    MAIN_TENSORS = "main-tensors"  # <name>.safetensors; values that are not tensors go in its metadata as JSON
    MAIN_TORCH = "main-torch"  # <name>.pt, read back with weights_only=True: third-party state (LR schedulers)
    RANK_JSON = "rank-json"  # ranks/<name>-rank00003.json
    RANK_TENSORS = "rank-tensors"  # ranks/<name>-rank00003.safetensors
    FOLDER = "folder"  # the part writes its own files, on every rank

    @property
    def per_rank(self) -> bool:
        return self in (Storage.RANK_JSON, Storage.RANK_TENSORS)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RankStateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_rank_states(self, saved: SavedRanks) -> None: ...


class FolderState(Protocol):
    def save_to(self, folder: Path) -> None: ...

    def load_from(self, folder: Path) -> None: ...


def read_tensors(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        state: dict[str, Any] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        extra = (handle.metadata() or {}).get("state")
    if extra:
        state.update(json.loads(extra))
    return state


def rank_file(name: str, storage: Storage, rank: int) -> str:
    suffix = "json" if storage is Storage.RANK_JSON else "safetensors"
    return f"{RANKS_DIR}/{name}-rank{rank:05d}.{suffix}"


def main_file(name: str, storage: Storage) -> str:
    return {Storage.MAIN_JSON: f"{name}.json", Storage.MAIN_TENSORS: f"{name}.safetensors",
            Storage.MAIN_TORCH: f"{name}.pt"}[storage]


class CheckpointReader:
    """The parts of one complete checkpoint folder, in its format."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        info = json.loads((folder / FORMAT_FILE).read_text(encoding="utf-8"))
        self.format, self.step, self.world_size = int(info["format"]), int(info["step"]), int(info["world_size"])
        self.parts: dict[str, str] = dict(info["parts"])

    def has(self, name: str) -> bool:
        return name in self.parts

    def read(self, name: str, storage: Storage) -> dict[str, Any]:
        path = self.folder / main_file(name, storage)
        if storage is Storage.MAIN_JSON:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        if storage is Storage.MAIN_TENSORS:
            return read_tensors(path)
        return dict(torch.load(path, map_location="cpu", weights_only=True))

    def read_rank(self, name: str, storage: Storage, rank: int) -> dict[str, Any] | None:
        path = self.folder / rank_file(name, storage, rank)
        if rank >= self.world_size or not path.is_file():
            return None
        if storage is Storage.RANK_JSON:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        return read_tensors(path)


class SavedRanks:
    """A per-rank part as saved: this rank's own state, and every saved rank's on demand (a resume on
    another layout needs them all; one on the same layout reads one file)."""

    def __init__(self, reader: CheckpointReader, name: str, storage: Storage, rank: int) -> None:
        self.reader, self.name, self.storage, self.rank = reader, name, storage, rank

    @property
    def world_size(self) -> int:
        return self.reader.world_size

    def own(self) -> dict[str, Any] | None:
        return self.reader.read_rank(self.name, self.storage, self.rank)

    def every(self) -> list[dict[str, Any] | None]:
        return [self.reader.read_rank(self.name, self.storage, r) for r in range(self.reader.world_size)]




def write_tensors(state: dict[str, Any], path: Path) -> None:
    """A state dict as safetensors: its tensors as tensors, every other value as JSON in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata={"state": json.dumps(rest)} if rest else None)
