"""Streaming prepared shards with WebDataset, split by rank and by DataLoader worker.

Equal step counts on every rank: the manifest knows how many samples (with repeats) each shard
holds, so every rank computes every rank's share for an epoch and all take the same number of
batches, ``min over ranks of (share // batch_size)``; the rest of each share is dropped and counted.
Batches are assembled in the main process (workers only decode), so that count is exact.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from dist_lora.data.prepare import MANIFEST_FORMAT, MANIFEST_NAME
from dist_lora.errors import DistLoraError


class ShardDataError(DistLoraError):
    """The prepared data cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    resolution: int
    shards: list[dict[str, Any]]
    tag_frequency: dict[str, dict[str, int]]

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        root = Path(folder)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise ShardDataError(f"data.shards '{root}' is not a folder; expected the output of `dist-lora prepare`.")
        if not path.is_file():
            raise ShardDataError(f"data.shards '{root}' has no {MANIFEST_NAME}; run `dist-lora prepare SRC {root}`.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ShardDataError(f"'{path}' is not valid JSON: {exc}") from exc
        if data.get("format") != MANIFEST_FORMAT:
            raise ShardDataError(f"'{path}' has format {data.get('format')!r}; expected {MANIFEST_FORMAT!r}.")
        missing = [s["file"] for s in data["shards"] if not (root / s["file"]).is_file()]
        if missing:
            raise ShardDataError(f"'{path}' lists shards that are missing: {missing[:3]}.")
        return cls(root, int(data["resolution"]), list(data["shards"]), dict(data.get("tag_frequency", {})))

    @property
    def num_samples_with_repeats(self) -> int:
        return sum(int(s["samples_with_repeats"]) for s in self.shards)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard order of an epoch: a permutation drawn from (seed, epoch) alone, identical on all ranks."""
    order = list(range(num_shards))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def rank_shards(order: list[int], rank: int, world_size: int) -> list[int]:
    return order[rank::world_size]


@dataclass(frozen=True)
class EpochPlan:
    steps: int  # batches every rank takes this epoch
    shard_indices: list[int]  # this rank's shards, in reading order
    dropped: int  # samples (with repeats) of this rank not used this epoch


def plan_epoch(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int,
               batch_size: int) -> EpochPlan:
    if len(manifest.shards) < world_size:
        raise ShardDataError(
            f"'{manifest.root}' has {len(manifest.shards)} shard(s) but the run has {world_size} ranks; every rank "
            f"needs at least one shard. Re-run `dist-lora prepare` with a smaller --shard-size.")
    order = epoch_shard_order(len(manifest.shards), seed, epoch)
    shares = [sum(int(manifest.shards[i]["samples_with_repeats"]) for i in rank_shards(order, r, world_size))
              for r in range(world_size)]
    steps = min(shares) // batch_size
    if steps == 0:
        raise ShardDataError(
            f"'{manifest.root}': the smallest rank share is {min(shares)} samples, fewer than batch_size "
            f"{batch_size}; lower training.batch_size or add data.")
    mine = rank_shards(order, rank, world_size)
    return EpochPlan(steps, mine, shares[rank] - steps * batch_size)


def _expand_repeats(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sample in samples:
        meta = json.loads(sample["json"])
        for r in range(int(meta.get("repeats", 1))):
            yield {**sample, "__key__": f"{sample['__key__']}#{r}", "meta": meta}


def _buffer_shuffle(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes -> float tensor [3, H, W] in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def _decode(sample: dict[str, Any]) -> dict[str, Any]:
    image_bytes = sample.get("png") or sample.get("jpg")
    if image_bytes is None:
        raise ShardDataError(f"sample '{sample['__key__']}' has no png/jpg member")
    return {"key": sample["__key__"], "pixels": decode_image(image_bytes),
            "caption": sample["txt"].decode("utf-8"), "meta": sample["meta"]}


class RankShardStream(IterableDataset):  # type: ignore[type-arg]
    """One rank's samples for one epoch; DataLoader workers split the rank's shards between them."""

    def __init__(self, urls: list[str], *, seed: int, epoch: int, rank: int, shuffle_buffer: int) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch, self.rank, self.shuffle_buffer = urls, seed, epoch, rank, shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
        )
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        for sample in _buffer_shuffle(_expand_repeats(iter(pipeline)), self.shuffle_buffer, rng):
            yield _decode(sample)


@dataclass
class Batch:
    keys: list[str]
    pixels: torch.Tensor
    captions: list[str]
    metas: list[dict[str, Any]]


def collate(samples: list[dict[str, Any]]) -> Batch:
    return Batch([s["key"] for s in samples], torch.stack([s["pixels"] for s in samples]),
                 [s["caption"] for s in samples], [s["meta"] for s in samples])


class ShardLoader:
    """Per-epoch batches for one rank, with the same number of steps on every rank."""

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 1, shuffle_buffer: int = 64) -> None:
        self.manifest = Manifest.read(folder)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.num_workers, self.shuffle_buffer = seed, num_workers, shuffle_buffer
        plan_epoch(self.manifest, seed=seed, epoch=0, rank=rank, world_size=world_size, batch_size=batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.manifest, seed=self.seed, epoch=epoch, rank=self.rank,
                          world_size=self.world_size, batch_size=self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        plan = self.plan(epoch)
        urls = [str(self.manifest.root / self.manifest.shards[i]["file"]) for i in plan.shard_indices]
        stream = RankShardStream(urls, seed=self.seed, epoch=epoch, rank=self.rank,
                                 shuffle_buffer=self.shuffle_buffer)
        workers = min(self.num_workers, len(urls))
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        pending: list[dict[str, Any]] = []
        produced = 0
        for sample in loader:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield collate(pending)
                pending = []
                produced += 1
                if produced == plan.steps:
                    return
        if produced < plan.steps:
            raise ShardDataError(f"rank {self.rank} read only {produced} of {plan.steps} batches in epoch {epoch}; "
                                 f"the shards in '{self.manifest.root}' do not match {MANIFEST_NAME}.")
