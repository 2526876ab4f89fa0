"""The checkpointer with fake parts: every storage kind, two ranks (threads), pruning, crashes, formats."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_lora.train.checkpoint import Checkpointer, CheckpointWorld, complete_checkpoints, resolve_resume
from dist_lora.train.checkpoint_format import CheckpointError, SavedRanks, Storage


class Counter:
    """A Stateful of plain values."""

    def __init__(self, value: int = 0) -> None:
        self.value, self.calls = value, 0

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        return {"value": self.value, "nested": {"list": [self.value, "x"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["nested"] == {"list": [state["value"], "x"]}
        self.value = state["value"]


class Weights:
    """A Stateful of tensors and a count (MAIN_TENSORS / RANK_TENSORS)."""

    def __init__(self, fill: float) -> None:
        self.tensor, self.updates = torch.full((3,), fill), int(fill)
        self.missed: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.tensor.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensor, self.updates = state["w"], state["updates"]

    def load_rank_states(self, saved: SavedRanks) -> None:
        own = saved.own()
        if own is not None:
            self.load_state_dict(own)

    def missing(self, folder: Path) -> None:
        self.missed = folder


class RankPosition:
    """A per-rank Stateful that, like a data position, can read every rank's state."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.own: dict[str, Any] | None = None
        self.every: list[dict[str, Any] | None] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "taken": list(range(self.rank + 1))}

    def load_rank_states(self, saved: SavedRanks) -> None:
        self.own, self.every = saved.own(), saved.every()


class EngineFiles:
    """A folder writer: every rank writes its own file, as a DeepSpeed engine does."""

    def __init__(self, rank: int) -> None:
        self.rank, self.loaded = rank, ""

    def save_to(self, folder: Path) -> None:
        (folder / f"engine-{self.rank}.txt").write_text(f"partition {self.rank}")

    def load_from(self, folder: Path) -> None:
        self.loaded = (folder / f"engine-{self.rank}.txt").read_text()


def _parts(rank: int, value: int) -> dict[str, tuple[Any, Storage]]:
    return {"train_state": (Counter(value), Storage.MAIN_JSON), "position": (RankPosition(rank), Storage.RANK_JSON),
            "engine": (EngineFiles(rank), Storage.FOLDER), "adapter": (Weights(float(value)), Storage.MAIN_TENSORS),
            "scheduler": (Counter(value * 10), Storage.MAIN_TORCH), "rng": (Weights(float(rank)), Storage.RANK_TENSORS)}


def _checkpointer(run: Path, rank: int, size: int, barrier: Callable[[], None], parts: dict[str, tuple[Any, Storage]],
                  keep: int = 2) -> Checkpointer:
    checkpointer = Checkpointer(run, keep, CheckpointWorld(rank, size, barrier))
    for name, (part, storage) in parts.items():
        checkpointer.register(name, part, storage, optional=name == "rng")
    return checkpointer


def _on_ranks(size: int, work: Callable[[int, Callable[[], None]], Any]) -> list[Any]:
    """``work(rank, barrier)`` on ``size`` threads with a shared barrier; each rank's result, or its error."""
    barrier = threading.Barrier(size, timeout=20)
    results: list[Any] = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, barrier.wait)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[rank] = exc
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_ranks_save_each_part_once_and_per_rank_parts_per_rank(tmp_path: Path) -> None:
    folders = _on_ranks(2, lambda rank, barrier: _checkpointer(tmp_path, rank, 2, barrier, _parts(rank, 7)).save(5))
    folder = folders[0]
    assert folders == [folder, folder] and folder == tmp_path / "checkpoints" / "step-00000005"
    assert json.loads((folder / "checkpoint.json").read_text()) == {
        "format": 2, "step": 5, "world_size": 2,
        "parts": {"train_state": "main-json", "position": "rank-json", "engine": "folder",
                  "adapter": "main-tensors", "scheduler": "main-torch", "rng": "rank-tensors"}}
    assert sorted(p.name for p in (folder / "ranks").iterdir()) == [
        "position-rank00000.json", "position-rank00001.json", "rng-rank00000.safetensors", "rng-rank00001.safetensors"]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "COMPLETE", "adapter.safetensors", "checkpoint.json", "engine-0.txt", "engine-1.txt", "scheduler.pt",
        "train_state.json"]

    def load(rank: int, barrier: Callable[[], None]) -> dict[str, tuple[Any, Storage]]:
        parts = _parts(rank, 0)
        checkpointer = _checkpointer(tmp_path, rank, 2, barrier, parts)
        checkpointer.load(resolve_resume("latest", tmp_path))
        assert checkpointer.last_step == 5 and checkpointer.loaded_from == folder
        return parts

    for rank, parts in enumerate(_on_ranks(2, load)):
        assert parts["train_state"][0].value == 7 and parts["scheduler"][0].value == 70
        assert torch.equal(parts["adapter"][0].tensor, torch.full((3,), 7.0)) and parts["adapter"][0].updates == 7
        assert torch.equal(parts["rng"][0].tensor, torch.full((3,), float(rank)))  # its own, not rank 0's
        assert parts["engine"][0].loaded == f"partition {rank}"
        position = parts["position"][0]
        assert position.own == {"rank": rank, "taken": list(range(rank + 1))}
        assert position.every == [{"rank": 0, "taken": [0]}, {"rank": 1, "taken": [0, 1]}]


def test_a_resume_on_more_ranks_finds_no_own_state_for_the_new_ones(tmp_path: Path) -> None:
    _checkpointer(tmp_path, 0, 1, lambda: None, _parts(0, 3)).save(2)
    parts = _parts(2, 0)
    _checkpointer(tmp_path, 2, 3, lambda: None, parts).load(tmp_path / "checkpoints" / "step-00000002",
                                                            ["train_state", "position", "rng"])
    assert parts["position"][0].own is None and parts["position"][0].every == [{"rank": 0, "taken": [0]}]
    assert torch.equal(parts["rng"][0].tensor, torch.full((3,), 2.0))  # kept: nothing saved for rank 2
    assert parts["train_state"][0].value == 3


def test_prunes_after_completing_and_skips_unmarked_folders(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path, 0, 1, lambda: None, _parts(0, 1), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000003"]
    unmarked = tmp_path / "checkpoints" / "step-00000009"
    unmarked.mkdir()
    (unmarked / "checkpoint.json").write_text("{}")
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoints" / "step-00000003"
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint folder \(no COMPLETE marker\)"):
        resolve_resume(str(unmarked), tmp_path)


def test_a_failure_while_saving_leaves_the_previous_checkpoint_complete(tmp_path: Path) -> None:
    parts = _parts(0, 1)
    checkpointer = _checkpointer(tmp_path, 0, 1, lambda: None, parts, keep=1)
    checkpointer.save(1)

    def broken() -> dict[str, Any]:
        raise OSError("disk full")

    parts["adapter"][0].state_dict = broken
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save(2)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000001"]
    assert checkpointer.last_step == 1
    del parts["adapter"][0].state_dict  # the instance's override: the class's method again
    checkpointer.save(2)  # the staging folder the failure left is replaced
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]


def test_missing_parts_newer_formats_and_part_errors_are_clear(tmp_path: Path) -> None:
    _checkpointer(tmp_path, 0, 1, lambda: None, {"train_state": (Counter(1), Storage.MAIN_JSON)}).save(4)
    folder = tmp_path / "checkpoints" / "step-00000004"
    needs_adapter = _checkpointer(tmp_path, 0, 1, lambda: None, _parts(0, 0))
    with pytest.raises(CheckpointError, match=r"holds no 'position' state, which this run needs \(it holds "
                                              r"\['train_state'\]\)"):
        needs_adapter.load(folder)
    optional = Weights(0.0)
    checkpointer = _checkpointer(tmp_path, 0, 1, lambda: None, {"train_state": (Counter(), Storage.MAIN_JSON)})
    checkpointer.register("ema", optional, Storage.MAIN_TENSORS, optional=True)
    checkpointer.load(folder)
    assert optional.missed == folder

    class Refusing(Counter):
        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise CheckpointError("it was written for another network")

    refusing = _checkpointer(tmp_path, 0, 1, lambda: None, {"train_state": (Refusing(), Storage.MAIN_JSON)})
    with pytest.raises(CheckpointError, match=r"step-00000004', part 'train_state': it was written for another"):
        refusing.load(folder)

    info = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(json.dumps({**info, "format": 3}))
    with pytest.raises(CheckpointError, match=r"is in checkpoint format 3; this version of dist_lora reads formats "
                                              r"1 and 2"):
        checkpointer.load(folder)
    (folder / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds neither checkpoint.json nor a format-1 position.json"):
        checkpointer.load(folder)


def test_registering_a_name_twice_or_loading_an_unknown_part_is_a_programming_error(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path, 0, 1, lambda: None, {"train_state": (Counter(), Storage.MAIN_JSON)})
    with pytest.raises(ValueError, match="registered twice"):
        checkpointer.register("train_state", Counter(), Storage.MAIN_JSON)
    folder = checkpointer.save(1)
    with pytest.raises(ValueError, match=r"no checkpoint part registered as \['optimizer'\]"):
        checkpointer.load(folder, ["optimizer"])
