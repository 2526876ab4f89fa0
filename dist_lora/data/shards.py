"""Streaming prepared shards, split by rank and by DataLoader worker, in single-bucket batches.

Equal steps on every rank, and every sample (times its repeats) used exactly once per epoch:
- shards go to ranks by a greedy balance of their sample counts, in a shard order drawn from
  (seed, epoch) alone, so every rank computes every rank's share from the manifest;
- every shard holds one bucket and its batches are its own, so a rank's batch count is ``sum over its
  shards of ceil(n / batch_size)``;
- every rank runs the largest rank's count (rounded up to a multiple of gradient accumulation); what a
  rank lacks is filled with padding samples of loss weight 0, counted in ``padded``. The last batch of a
  bucket is completed the same way. Padding is also what replaces a sample that turns out to be
  unreadable at training time, so a damaged shard never changes a rank's step count (no DDP hang).
Workers read, batch and decode; the training process takes their batches in a fixed round (worker 0, 1,
..., skipping finished ones), whatever order they arrive in, so the sequence is the same on every run and
a resume continues it exactly.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dist_lora.data.augment import Augment, AugmentPolicy
from dist_lora.data.captions import CaptionPolicy, CaptionTransform
from dist_lora.data.manifest import MANIFEST_NAME, Manifest, ShardDataError
from dist_lora.data.position import EpochProgress, UsedEntries, is_position
from dist_lora.data.stream import (
    EpochMailbox,
    MailboxStream,
    RankShardStream,
    StreamSpec,
    shard_entries,
    taken_entries,
    to_runs,
    unpack_unit,
)
from dist_lora.data.tar_samples import BadData, tar_samples
from dist_lora.utils.stop_signals import ignore_in_worker

log = logging.getLogger(__name__)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard order of an epoch: a permutation drawn from (seed, epoch) alone, identical on all ranks."""
    order = list(range(num_shards))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def shard_sizes(manifest: Manifest, used: dict[str, int] | None = None) -> list[int]:
    """Samples (with repeats) each shard offers in an epoch, less the ``used`` ones (per shard file)."""
    used = used or {}
    return [int(s["samples_with_repeats"]) - used.get(s["file"], 0) for s in manifest.shards]


def assign_shards(manifest: Manifest, seed: int, epoch: int, world_size: int,
                  sizes: list[int] | None = None) -> list[list[int]]:
    """Each rank's shards for an epoch, in reading order: largest shards first to the least-loaded rank.

    ``sizes`` (what each shard still offers) defaults to the manifest's counts; shards with nothing
    left are not assigned."""
    order = epoch_shard_order(len(manifest.shards), seed, epoch)
    position = {shard: i for i, shard in enumerate(order)}
    sizes = sizes if sizes is not None else shard_sizes(manifest)
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    # The least-loaded rank (ties: fewer shards, then the lower rank) from a heap: O(S log W), not O(S x W).
    least_loaded = [(0, 0, rank) for rank in range(world_size)]
    for shard in sorted((i for i in order if sizes[i] > 0), key=lambda i: (-sizes[i], position[i])):
        load, count, rank = least_loaded[0]
        assigned[rank].append(shard)
        heapq.heapreplace(least_loaded, (load + sizes[shard], count + 1, rank))
    return [sorted(shards, key=position.__getitem__) for shards in assigned]


def rank_batches(manifest: Manifest, shards: list[int], batch_size: int, sizes: list[int] | None = None) -> int:
    sizes = sizes if sizes is not None else shard_sizes(manifest)
    return sum(math.ceil(sizes[i] / batch_size) for i in shards)


@dataclass(frozen=True)
class EpochPlan:
    steps: int  # micro-batches every rank takes this epoch
    shard_indices: list[int]  # this rank's shards, in reading order
    samples: int  # this rank's real samples (with repeats)
    padded: int  # padding samples (loss weight 0) this rank adds


def plan_epoch(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
               num_workers: int = 0, multiple_of: int = 1, used: dict[str, int] | None = None,
               idle_ranks: bool = False) -> EpochPlan:
    """One rank's share of an epoch. ``used``: samples per shard file already trained on in this epoch by
    another layout of ranks (a resume on another world size); the plan covers the rest. ``idle_ranks``:
    fewer shards than readers is allowed (a rank without one pads; small validation sets)."""
    readers = world_size * max(1, num_workers)
    if not used and not idle_ranks and len(manifest.shards) < readers:
        raise ShardDataError(
            f"'{manifest.root}' has {len(manifest.shards)} shard(s) but {world_size} rank(s) x "
            f"{max(1, num_workers)} worker(s) = {readers} readers need one each. Re-run `dist-lora prepare` with a "
            f"smaller --shard-size, or lower data.num_workers.")
    sizes = shard_sizes(manifest, used)
    assigned = assign_shards(manifest, seed, epoch, world_size, sizes)
    most = max(rank_batches(manifest, shards, batch_size, sizes) for shards in assigned)
    steps = math.ceil(most / multiple_of) * multiple_of
    samples = sum(sizes[i] for i in assigned[rank])
    return EpochPlan(steps, assigned[rank], samples, steps * batch_size - samples)


# -- batches (main process) ----------------------------------------------------------------------------

@dataclass
class Batch:
    keys: list[str]  # "pad:<key>" for padding samples
    captions: list[str]
    metas: list[dict[str, Any]]
    weights: torch.Tensor  # 1 for real samples, 0 for padding
    pixels: torch.Tensor | None = None  # uint8 [B, 3, H, W]
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    shards: list[str] = field(default_factory=list)  # the shard file of each sample
    masks: torch.Tensor | None = None  # uint8 [B, 1, H, W], the loss weight of each pixel (255 = 1)

    @property
    def real_keys(self) -> list[str]:
        return [k for k in self.keys if not k.startswith("pad:")]

    @property
    def real_samples(self) -> list[tuple[str, str]]:
        """(shard file, key) of each real sample."""
        return [(shard, key) for shard, key in zip(self.shards, self.keys, strict=True) if not key.startswith("pad:")]


def _stack(samples: list[dict[str, Any]], name: str) -> torch.Tensor | None:
    return torch.stack([s[name] for s in samples]) if name in samples[0] else None


def collate(samples: list[dict[str, Any]], weights: list[float]) -> Batch:
    return Batch([s["key"] for s in samples], [s["caption"] for s in samples], [s["meta"] for s in samples],
                 torch.tensor(weights, dtype=torch.float32), _stack(samples, "pixels"),
                 _stack(samples, "latent_mean"), _stack(samples, "latent_std"), _stack(samples, "hidden"),
                 _stack(samples, "pooled"), [s["shard"] for s in samples], _stack(samples, "mask"))


def _padded(samples: list[dict[str, Any]], batch_size: int) -> Batch:
    """``samples`` completed to ``batch_size`` with weight-0 copies of them (same bucket shape)."""
    pads = [{**samples[i % len(samples)], "key": f"pad:{samples[i % len(samples)]['key']}"}
            for i in range(batch_size - len(samples))]
    return collate(samples + pads, [1.0] * len(samples) + [0.0] * len(pads))


@dataclass
class DataStats:
    """Counts since this process started (this rank): bad-data records (an undecodable sample, a damaged
    shard's tail) and padding samples. Each damaged place is logged once."""

    bad_records: int = 0
    padded_samples: int = 0
    shards_opened: int = 0  # shards the workers opened (a resume opens none it finished before)
    logged: set[tuple[str, str]] = field(default_factory=set)

    def bad(self, item: BadData) -> None:
        self.bad_records += 1
        if (item.shard, item.key) not in self.logged:
            self.logged.add((item.shard, item.key))
            log.warning("skipping bad data in shard %s, sample %s: %s", item.shard, item.key or "-", item.reason)


class ShardLoader:
    """Per-epoch batches for one rank, with the same number of steps on every rank."""

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 1, shuffle_buffer: int = 64, captions: CaptionPolicy | None = None,
                 shard_urls: str = "", use_latents: bool = False, use_text: bool = False,
                 multiple_of: int = 1, idle_ranks: bool = False, augment: AugmentPolicy | None = None,
                 use_masks: bool = False) -> None:
        self.manifest = Manifest.read(folder)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.num_workers, self.shuffle_buffer = seed, num_workers, shuffle_buffer
        self.captions = captions or CaptionPolicy(CaptionTransform())
        self.augment, self.use_masks = augment or AugmentPolicy(Augment()), use_masks
        self.use_latents, self.use_text, self.multiple_of = use_latents, use_text, multiple_of
        self.idle_ranks = idle_ranks
        cache = self.manifest.cache
        if use_latents and not (cache and cache.latents):
            raise ShardDataError(f"'{self.manifest.root}' holds no cached latents; run `dist-lora cache` first.")
        if use_text and not (cache and cache.text):
            raise ShardDataError(f"'{self.manifest.root}' holds no cached text-encoder outputs.")
        self.urls = self.manifest.urls(shard_urls)
        self.stats = DataStats()
        self.progress = EpochProgress(layout=self.layout)
        self._template: Batch | None = None
        self._loader: DataLoader | None = None  # type: ignore[type-arg]
        self._mailbox: EpochMailbox | None = None
        self._remove_mailbox: weakref.finalize | None = None  # type: ignore[type-arg]

    @property
    def layout(self) -> list[int]:
        return [self.world_size, self.num_workers, self.batch_size, self.seed, self.multiple_of, self.shuffle_buffer]

    def can_resume(self, progress: EpochProgress, epoch: int, batches: int) -> bool:
        """Whether ``progress`` describes this loader at (epoch, batches): same ranks, workers, batch, seed."""
        return (progress.epoch, progress.batches, progress.layout) == (epoch, batches, self.layout)

    def continuation(self, saved: list[dict[str, Any] | None], epoch: int, batches: int) -> EpochProgress | None:
        """Where this rank resumes epoch ``epoch`` from every rank's saved position (``batches``: this
        layout's batches done, as the checkpoint counts them).

        The same layout resumes its own position exactly. Another layout (more or fewer ranks or
        workers, another batch size) starts at the stopped run's sample position: the entries any old
        rank used are left out and the new ranks share out the rest. Positions of checkpoint format 1
        (sample keys) are read the same way. None: replay the epoch (no usable position)."""
        mine = saved[self.rank] if self.rank < len(saved) else None
        if is_position(mine, epoch):
            progress = EpochProgress.from_json(mine)  # type: ignore[arg-type]
            if self.can_resume(progress, epoch, batches):
                return progress
        if saved and all(is_position(state, epoch) for state in saved):
            used = self._used_by([EpochProgress.from_json(state) for state in saved])  # type: ignore[arg-type]
        elif saved and all(state and "used" in state and int(state["epoch"]) == epoch for state in saved):
            used = self._used_by_keys(saved)  # type: ignore[arg-type]
        else:
            return None
        return EpochProgress(epoch, 0, self.layout, inherited=used)

    def _used_by(self, positions: list[EpochProgress]) -> UsedEntries:
        """Every entry the ranks of ``positions`` (one layout, in rank order) used this epoch, recomputed
        from their plan: shards before each worker's current one whole, the current one by replaying its
        shuffle on entry indices (no shard is read)."""
        world, workers, batch, seed, _, buffer = positions[0].layout
        inherited = positions[0].inherited
        manifest = self.manifest
        sizes = shard_sizes(manifest, inherited.counts(manifest))
        assigned = assign_shards(manifest, seed, positions[0].epoch, world, sizes)
        used = UsedEntries(set(inherited.complete), {k: set(v) for k, v in inherited.partial.items()})
        for rank, position in enumerate(positions):
            lanes = max(1, min(workers, len(assigned[rank])))
            for worker, (current, taken, ended) in enumerate(position.workers):
                mine = assigned[rank][worker::lanes]
                for shard in mine[:len(mine) if ended else current]:
                    used.complete.add(shard)
                    used.partial.pop(manifest.shards[shard]["file"], None)
                if not ended and taken and current < len(mine):
                    shard = mine[current]
                    file, entries = manifest.shards[shard]["file"], int(manifest.shards[shard]["samples_with_repeats"])
                    before = inherited.partial.get(file, set())
                    used.add(manifest, shard, taken_entries(entries, before, taken, batch, buffer, seed,
                                                            position.epoch, file))
        return used

    def _used_by_keys(self, saved: list[dict[str, Any]]) -> UsedEntries:
        """A format-1 position (the sample keys each rank used) as entry indices: each named shard's
        samples are read once to number its entries."""
        keys: dict[str, set[str]] = {}
        for state in saved:
            for shard, names in state["used"].items():
                keys.setdefault(shard, set()).update(names)
        index = {s["file"]: i for i, s in enumerate(self.manifest.shards)}
        used = UsedEntries()
        for file, names in keys.items():
            if file not in index:
                continue
            shard = index[file]
            samples = tar_samples(self.urls[shard], file, int(self.manifest.shards[shard]["samples"]))
            numbered = {item["__key__"]: i for i, item in shard_entries(samples, set(), frozenset())
                        if not isinstance(item, BadData)}  # type: ignore[misc]
            used.add(self.manifest, shard, {numbered[k] for k in names if k in numbered})
        return used

    def plan(self, epoch: int, progress: EpochProgress | None = None) -> EpochPlan:
        """This rank's plan for ``epoch``; with ``progress``, of the part an earlier layout left over."""
        used = progress.inherited.counts(self.manifest) if progress else None
        return plan_epoch(self.manifest, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          batch_size=self.batch_size, num_workers=self.num_workers, multiple_of=self.multiple_of,
                          used=used, idle_ranks=self.idle_ranks)

    def stream(self, epoch: int, shard_indices: list[int], progress: EpochProgress | None = None) -> RankShardStream:
        starts = [[shard, taken] for shard, taken, _ in progress.workers] if progress else []
        drop = {file: to_runs(entries) for file, entries in progress.inherited.partial.items()} if progress else {}
        spec = StreamSpec(self.seed, epoch, self.rank, self.shuffle_buffer, self.batch_size, self.captions,
                          self.use_latents, self.use_text, starts, drop, augment=self.augment, use_masks=self.use_masks)
        shards = [(self.urls[i], self.manifest.shards[i]["file"], int(self.manifest.shards[i]["samples"]))
                  for i in shard_indices]
        return RankShardStream(shards, spec)

    def epoch(self, epoch: int, resume: EpochProgress | None = None) -> Iterator[Batch]:
        """The epoch's batches; with ``resume`` (saved by ``progress`` at a checkpoint), the batches after
        those already taken, identical to the uninterrupted epoch's. Each worker opens no shard before the
        one it stopped in, and decodes nothing it took before."""
        plan = self.plan(epoch, resume)
        if resume is not None and not self.can_resume(resume, epoch, resume.batches):
            raise ShardDataError(f"rank {self.rank}: the saved data position (epoch {resume.epoch}, layout "
                                 f"{resume.layout}) is not for epoch {epoch} of this loader (layout {self.layout}).")
        workers = min(self.num_workers, len(plan.shard_indices))
        lanes = max(1, workers)
        fresh = resume is None or not resume.workers
        self.progress = EpochProgress(epoch, resume.batches if resume else 0, self.layout,
                                      [[0, 0, 0] for _ in range(lanes)] if fresh else [list(w) for w in resume.workers],
                                      0 if fresh else resume.next_worker,
                                      resume.inherited if resume else UsedEntries())
        if len(self.progress.workers) != lanes:
            raise ShardDataError(f"rank {self.rank}: the saved data position has {len(self.progress.workers)} "
                                 f"worker(s) but this epoch reads with {lanes}; resume with the same data.")
        stream = self.stream(epoch, plan.shard_indices, self.progress)
        units: Iterable[dict[str, Any]] = (
            (unpack_unit(unit) for unit in self._worker_loader(stream, workers)) if workers else iter(stream))
        self._template = None
        produced = self.progress.batches
        for unit in self._in_round_order(units):
            batch = self._batch_of(unit["records"])
            produced += 1
            if produced > plan.steps:
                raise ShardDataError(f"rank {self.rank} read more than the {plan.steps} batches planned for epoch "
                                     f"{epoch}; the shards in '{self.manifest.root}' do not match {MANIFEST_NAME}.")
            if batch is None:  # every entry of the batch failed to decode: a filler takes its place
                batch = self._filler(epoch)
            self.progress.batches += 1
            yield batch
        while produced < plan.steps:  # this rank had fewer batches than the busiest rank
            produced += 1
            self.progress.batches += 1
            yield self._filler(epoch)

    def _in_round_order(self, units: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The workers' batch units in the fixed round, from the progress's next worker on: whatever order
        the DataLoader delivers them in, a worker's units wait until its turn (a few at most)."""
        progress = self.progress
        lanes = len(progress.workers)
        waiting: dict[int, deque[dict[str, Any]]] = {w: deque() for w in range(lanes)}
        source = iter(units)
        turn = progress.next_worker
        while any(not ended for _, _, ended in progress.workers):
            worker = next(w % lanes for w in range(turn, turn + lanes) if not progress.workers[w % lanes][2])
            while not waiting[worker]:
                unit = next(source, None)
                if unit is None:  # the stream ended without its end marker: nothing more will come
                    waiting[worker].append({"kind": "end", "worker": worker})
                    break
                waiting[int(unit["worker"])].append(unit)
            unit = waiting[worker].popleft()
            kind = unit["kind"]
            if kind == "opened":
                self.stats.shards_opened += 1
            elif kind == "bad":
                for record in unit["records"]:
                    self.stats.bad(record["bad"])
            elif kind == "end":
                progress.workers[worker][2] = 1
                turn = worker + 1
            else:
                progress.workers[worker] = [int(unit["shard"]), int(unit["batch"]) + 1, 0]
                turn = progress.next_worker = (worker + 1) % lanes
                yield unit

    def _batch_of(self, records: list[dict[str, Any]]) -> Batch | None:
        """A unit's records as a batch, completed with padding; None when none of them decoded."""
        samples = []
        for record in records:
            if "bad" in record:
                self.stats.bad(record["bad"])
            else:
                samples.append(record)
        if not samples:
            return None
        batch = _padded(samples, self.batch_size) if len(samples) < self.batch_size else \
            collate(samples, [1.0] * len(samples))
        self.stats.padded_samples += self.batch_size - len(samples)
        self._template = batch
        return batch

    def _filler(self, epoch: int) -> Batch:
        """A weight-0 copy of the last real batch (or of the epoch's first readable sample)."""
        template = self._template if self._template is not None else self._filler_template(epoch)
        if template is None:
            raise ShardDataError(f"rank {self.rank} could read no sample of its shards in epoch {epoch}; see "
                                 f"the warnings above for the damaged shards.")
        self._template = template
        self.stats.padded_samples += self.batch_size
        return Batch([f"pad:{k.removeprefix('pad:')}" for k in template.keys], template.captions, template.metas,
                     torch.zeros_like(template.weights), template.pixels, template.latent_mean, template.latent_std,
                     template.hidden, template.pooled, template.shards, template.masks)

    def _filler_template(self, epoch: int) -> Batch | None:
        """A batch to copy as weight-0 filler, decoded in this process from the epoch's first readable sample."""
        for index in epoch_shard_order(len(self.manifest.shards), self.seed, epoch):
            for unit in self.stream(epoch, [index]):
                samples = [r for r in unit.get("records", []) if "bad" not in r] if unit["kind"] == "batch" else []
                if samples:
                    return _padded(samples[:1], self.batch_size)
        return None

    def _worker_loader(self, stream: RankShardStream, workers: int) -> DataLoader:  # type: ignore[type-arg]
        """A DataLoader whose worker processes live across epochs (no start-up cost per epoch); each
        epoch's shards and settings reach them through the mailbox."""
        if self._mailbox is None:
            folder = Path(tempfile.mkdtemp(prefix="dist_lora_loader_"))
            self._mailbox = EpochMailbox(folder)
            # Also removed when a loader that was never closed is collected, or at interpreter exit.
            self._remove_mailbox = weakref.finalize(self, shutil.rmtree, folder, True)
        self._mailbox.post(stream)
        if self._loader is None or self._loader.num_workers != workers:
            # Two units ahead per worker keep a batch ready.
            self._loader = DataLoader(MailboxStream(self._mailbox), batch_size=None, num_workers=workers,
                                      persistent_workers=True, prefetch_factor=2, worker_init_fn=ignore_in_worker)
        return self._loader

    def close(self) -> None:
        """Stop the worker processes and remove the mailbox."""
        self._loader = None  # its iterator shuts the workers down when collected
        if self._remove_mailbox is not None:
            self._remove_mailbox()
            self._mailbox = None
