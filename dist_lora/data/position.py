"""A rank's position in an epoch of shards, and the entries an earlier layout of ranks already used.

Both go into checkpoints, so both stay small however many samples there are: a position is a few
integers per DataLoader worker, and used entries are bitmaps.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from dist_lora.data.manifest import Manifest


def _bitmap(indices: set[int]) -> str:
    """Indices as a bitmap, base64: an entry or a shard costs a bit."""
    bits = bytearray(max(indices, default=-1) // 8 + 1)
    for i in indices:
        bits[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(bits)).decode("ascii")


def _indices(bitmap: str) -> set[int]:
    return {i * 8 + bit for i, byte in enumerate(base64.b64decode(bitmap)) for bit in range(8) if byte >> bit & 1}


@dataclass
class UsedEntries:
    """The entries of an epoch some layout of ranks already used: whole shards (by manifest index) and, per
    shard file, [start, length] runs of entry indices. Kilobytes however many samples: whole shards are
    a bitmap, and a layout leaves at most one partly read shard per reader."""

    complete: set[int] = field(default_factory=set)
    partial: dict[str, set[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"complete": _bitmap(self.complete),
                "partial": {shard: _bitmap(entries) for shard, entries in sorted(self.partial.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsedEntries:
        return cls(_indices(data.get("complete", "")),
                   {str(k): _indices(v) for k, v in data.get("partial", {}).items()})

    def __bool__(self) -> bool:
        return bool(self.complete or self.partial)

    def counts(self, manifest: Manifest) -> dict[str, int]:
        """Entries used per shard file."""
        used = {manifest.shards[i]["file"]: int(manifest.shards[i]["samples_with_repeats"]) for i in self.complete}
        return {**{shard: len(entries) for shard, entries in self.partial.items()}, **used}

    def add(self, manifest: Manifest, shard: int, entries: set[int]) -> None:
        file = manifest.shards[shard]["file"]
        merged = self.partial.pop(file, set()) | entries
        if len(merged) >= int(manifest.shards[shard]["samples_with_repeats"]):
            self.complete.add(shard)
        elif merged:
            self.partial[file] = merged


@dataclass
class EpochProgress:
    """Where a rank's loader stands in an epoch; saved in checkpoints, some hundred bytes per rank.

    Per worker: the index (in that worker's list of shards) of the shard it reads, the batches it took
    from it, and whether its stream has ended; whose batch comes next in the round; the batches yielded
    (fillers included); and what an earlier layout of ranks used this epoch (``inherited``). The same
    layout (ranks, workers, batch size, seed, accumulation, shuffle buffer) continues it bit for bit; another
    layout recomputes from every old rank's position which entries were used and shares out the rest."""

    epoch: int = 0
    batches: int = 0
    layout: list[int] = field(default_factory=list)  # [world size, workers, batch, seed, accumulation, buffer]
    workers: list[list[int]] = field(default_factory=list)  # per worker [shard index, batches taken, ended]
    next_worker: int = 0
    inherited: UsedEntries = field(default_factory=UsedEntries)

    def to_json(self) -> dict[str, Any]:
        return {**self.rank_json(), "inherited": self.inherited.to_json()}

    def rank_json(self) -> dict[str, Any]:
        """The rank's own part, without ``inherited`` (the same on every rank: a checkpoint holds it once)."""
        return {"epoch": self.epoch, "batches": self.batches, "layout": self.layout, "workers": self.workers,
                "next_worker": self.next_worker}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpochProgress:
        return cls(int(data["epoch"]), int(data["batches"]), list(data["layout"]),
                   [list(w) for w in data["workers"]], int(data["next_worker"]),
                   UsedEntries.from_json(data.get("inherited", {})))


def is_position(state: dict[str, Any] | None, epoch: int) -> bool:
    return bool(state) and "workers" in state and int(state["epoch"]) == epoch  # type: ignore[index]
