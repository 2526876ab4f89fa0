"""Reading checkpoints of format 1 (the layout before named parts), so a run stopped by an earlier
version resumes: its position.json and run_state.json become the train state, data_progress.json
(every rank's position in one file) and rng.safetensors (every rank's RNG) the per-rank parts,
ema.json the average's update count. The other files kept their names in format 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from dist_lora.train.checkpoint_format import CheckpointReader, Storage, read_tensors

_POSITION, _RUN_STATE, _DATA, _RNG = "position.json", "run_state.json", "data_progress.json", "rng.safetensors"


def is_format_one(folder: Path) -> bool:
    return (folder / _POSITION).is_file()


class FormatOneReader(CheckpointReader):
    def __init__(self, folder: Path) -> None:  # noqa: D107 - no checkpoint.json to read
        self.folder, self.format = folder, 1
        self.position = json.loads((folder / _POSITION).read_text(encoding="utf-8"))
        self.step = int(self.position["step"])
        data = folder / _DATA
        self._data: list[dict[str, Any] | None] = json.loads(data.read_text(encoding="utf-8")) if data.is_file() else []
        self._rng = load_file(str(folder / _RNG)) if (folder / _RNG).is_file() else {}
        self.world_size = max(len(self._data), len(self._rng))
        present = {"train_state": True, "data_position": bool(self._data), "rng": bool(self._rng),
                   "adapter_state": (folder / "adapter_state.safetensors").is_file(),
                   "lr_scheduler": (folder / "lr_scheduler.pt").is_file(), "engine": True,
                   "ema": (folder / "ema.safetensors").is_file()}
        self.parts = {name: "format-1" for name, held in present.items() if held}

    def read(self, name: str, storage: Storage) -> dict[str, Any]:
        if name == "train_state":
            history_file = self.folder / _RUN_STATE
            history = json.loads(history_file.read_text(encoding="utf-8")) if history_file.is_file() else {}
            return {**self.position, "first_loss": history.get("first_loss"), "resumes": history.get("resumes", [])}
        if name == "ema":
            return {**read_tensors(self.folder / "ema.safetensors"),
                    **json.loads((self.folder / "ema.json").read_text(encoding="utf-8"))}
        return super().read(name, storage)

    def read_rank(self, name: str, storage: Storage, rank: int) -> dict[str, Any] | None:
        if name == "data_position":
            return self._data[rank] if rank < len(self._data) else None
        if name == "rng":
            key = f"rank{rank}"
            return {"cpu": self._rng[key]} if key in self._rng else None
        return None
