"""Streaming prepared shards, split by rank and by DataLoader worker, in single-bucket batches.

Equal steps on every rank, and every sample (times its repeats) used exactly once per epoch:
- shards go to ranks by a greedy balance of their sample counts, in a shard order drawn from
  (seed, epoch) alone, so every rank computes every rank's share from the manifest;
- every shard holds one bucket, so a rank's batch count is ``sum over buckets of ceil(n / batch_size)``;
- every rank runs the largest rank's count (rounded up to a multiple of gradient accumulation); what a
  rank lacks is filled with padding samples of loss weight 0, counted in ``padded``. The last batch of a
  bucket is completed the same way. Padding is also what replaces a sample that turns out to be
  unreadable at training time, so a damaged shard never changes a rank's step count (no DDP hang).
Batches are assembled in the main process (workers only read and decode), so these counts are exact.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dist_lora.data.augment import Augment, AugmentPolicy
from dist_lora.data.captions import CaptionPolicy, CaptionTransform
from dist_lora.data.manifest import MANIFEST_NAME, Manifest, ShardDataError
from dist_lora.data.stream import EpochMailbox, MailboxStream, RankShardStream, StreamSpec, unpack_chunk
from dist_lora.data.tar_samples import BadData
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
    per_bucket: dict[tuple[int, ...], int] = {}
    for i in shards:
        bucket = tuple(manifest.shards[i].get("bucket", (manifest.resolution, manifest.resolution)))
        per_bucket[bucket] = per_bucket.get(bucket, 0) + sizes[i]
    return sum(math.ceil(n / batch_size) for n in per_bucket.values())


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
    placeholders: int = 0  # samples passed undecoded because they were consumed before a resume
    logged: set[tuple[str, str]] = field(default_factory=set)

    def bad(self, item: BadData) -> None:
        self.bad_records += 1
        if (item.shard, item.key) not in self.logged:
            self.logged.add((item.shard, item.key))
            log.warning("skipping bad data in shard %s, sample %s: %s", item.shard, item.key or "-", item.reason)


def _shape_key(sample: dict[str, Any]) -> tuple[int, ...]:
    # From the record, not the tensor, so that resume placeholders (never decoded) group alike.
    bucket = sample["meta"].get("bucket")
    if bucket is not None:
        return tuple(bucket)
    tensor = sample["latent_mean"] if "latent_mean" in sample else sample["pixels"]
    return tuple(tensor.shape)


@dataclass
class EpochProgress:
    """Where a rank's loader stands in an epoch; saved in checkpoints.

    A resume with the same layout (ranks, workers, batch size, seed, accumulation) continues bit for bit
    and decodes nothing twice (``consumed``, ``last``, ``bad``). A resume on another layout continues at
    the sample: ``used`` holds, per shard file, every sample key this epoch no longer offers (trained on,
    failed to decode, or used by an earlier layout), and the new ranks share out the rest."""

    epoch: int = 0
    batches: int = 0  # batches yielded
    consumed: list[str] = field(default_factory=list)  # real sample keys of those batches but the last one
    last: list[str] = field(default_factory=list)  # real sample keys of the last batch with any
    bad: list[str] = field(default_factory=list)  # sample keys that failed to decode
    layout: list[int] = field(default_factory=list)  # [world size, workers, batch size, seed, accumulation]
    used: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "consumed": self.consumed, "last": self.last,
                "bad": sorted(set(self.bad)), "layout": self.layout,
                "used": {shard: sorted(keys) for shard, keys in sorted(self.used.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpochProgress:
        return cls(int(data["epoch"]), int(data["batches"]), list(data["consumed"]), list(data["last"]),
                   list(data["bad"]), list(data.get("layout", [])),
                   {str(k): list(v) for k, v in data.get("used", {}).items()})

    def mark_used(self, shard: str, key: str) -> None:
        self.used.setdefault(shard, []).append(key)

    def inherited(self) -> dict[str, set[str]]:
        """Per shard file, the keys an earlier layout used: in ``used`` but not in this layout's batches."""
        own = set(self.consumed) | set(self.last) | set(self.bad)
        found = {shard: set(keys) - own for shard, keys in self.used.items()}
        return {shard: keys for shard, keys in found.items() if keys}


def merge_progress(saved: list[dict[str, Any]], epoch: int, layout: list[int]) -> EpochProgress | None:
    """A start for ``layout`` at the stopped run's sample position, from every old rank's saved position:
    nothing consumed yet in the new layout, and everything any old rank used left out. None when a rank's
    position is missing, is for another epoch, or predates ``used`` (the epoch is then replayed)."""
    if not saved or any(not s or "used" not in s or int(s["epoch"]) != epoch for s in saved):
        return None
    used: dict[str, set[str]] = {}
    for state in saved:
        for shard, keys in state["used"].items():
            used.setdefault(shard, set()).update(keys)
    return EpochProgress(epoch, 0, layout=list(layout), used={shard: sorted(keys) for shard, keys in used.items()})


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
        return [self.world_size, self.num_workers, self.batch_size, self.seed, self.multiple_of]

    def can_resume(self, progress: EpochProgress, epoch: int, batches: int) -> bool:
        """Whether ``progress`` describes this loader at (epoch, batches): same ranks, workers, batch, seed."""
        return (progress.epoch, progress.batches, progress.layout) == (epoch, batches, self.layout)

    def continuation(self, saved: list[dict[str, Any] | None], epoch: int, batches: int) -> EpochProgress | None:
        """Where this rank resumes epoch ``epoch`` from every rank's saved position (``batches``: this
        layout's batches done, as the checkpoint counts them).

        The same layout resumes its own position exactly. Another layout (more or fewer ranks or
        workers, another batch size) starts at the stopped run's sample position: the samples any old
        rank used are left out and the new ranks share out the rest. None: replay the epoch (positions
        from before ``used`` existed)."""
        mine = saved[self.rank] if self.rank < len(saved) else None
        if mine is not None:
            progress = EpochProgress.from_json(mine)
            if self.can_resume(progress, epoch, batches):
                return progress
        complete = [state for state in saved if state is not None]
        return merge_progress(complete, epoch, self.layout) if len(complete) == len(saved) else None

    def plan(self, epoch: int, progress: EpochProgress | None = None) -> EpochPlan:
        """This rank's plan for ``epoch``; with ``progress``, of the part an earlier layout left over."""
        used = {shard: len(keys) for shard, keys in progress.inherited().items()} if progress else None
        return plan_epoch(self.manifest, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          batch_size=self.batch_size, num_workers=self.num_workers, multiple_of=self.multiple_of,
                          used=used, idle_ranks=self.idle_ranks)

    def stream(self, epoch: int, shard_indices: list[int], resume: EpochProgress | None = None) -> RankShardStream:
        skip = frozenset(resume.consumed) if resume else frozenset()
        bad = frozenset(resume.bad) if resume else frozenset()
        drop = frozenset(k for keys in resume.inherited().values() for k in keys) if resume else frozenset()
        spec = StreamSpec(self.seed, epoch, self.rank, self.shuffle_buffer, self.captions, self.use_latents,
                          self.use_text, skip, bad, drop, self.augment, self.use_masks)
        shards = [(self.urls[i], self.manifest.shards[i]["file"], int(self.manifest.shards[i]["samples"]))
                  for i in shard_indices]
        return RankShardStream(shards, spec)

    def epoch(self, epoch: int, resume: EpochProgress | None = None) -> Iterator[Batch]:
        """The epoch's batches; with ``resume`` (saved by ``progress`` at a checkpoint), the batches after
        those already consumed, identical to the uninterrupted epoch's.

        Consumed samples still pass through the workers, as undecoded placeholders, so every worker's
        sequence, and with it the interleaving and the bucket grouping, is the same as before."""
        plan = self.plan(epoch, resume)
        if resume is not None and not self.can_resume(resume, epoch, resume.batches):
            raise ShardDataError(f"rank {self.rank}: the saved data position (epoch {resume.epoch}, layout "
                                 f"{resume.layout}) is not for epoch {epoch} of this loader (layout {self.layout}).")
        skip = resume.batches if resume else 0
        self.progress = EpochProgress(epoch, skip, list(resume.consumed) if resume else [],
                                      list(resume.last) if resume else [], list(resume.bad) if resume else [],
                                      self.layout, {k: list(v) for k, v in resume.used.items()} if resume else {})
        workers = min(self.num_workers, len(plan.shard_indices))
        stream = self.stream(epoch, plan.shard_indices, resume)
        samples: Iterable[dict[str, Any]] = (
            (record for chunk in self._worker_loader(stream, workers) for record in unpack_chunk(chunk))
            if workers else DataLoader(stream, batch_size=None))
        produced = 0
        for batch in self._batches(samples, skip):
            produced += 1
            if produced > plan.steps:
                raise ShardDataError(f"rank {self.rank} read more than the {plan.steps} batches planned for epoch "
                                     f"{epoch}; the shards in '{self.manifest.root}' do not match {MANIFEST_NAME}.")
            if produced <= skip:
                continue  # consumed before the checkpoint: placeholders, or the last consumed batch
            self._record(batch)
            yield batch
        template = self._template  # the last real batch: fillers copy it with weight 0
        if template is None and not plan.shard_indices and produced < plan.steps:
            template = self._filler_template(epoch)  # a resume left this rank nothing to read
        while produced < plan.steps:  # this rank had fewer batches than the busiest rank
            if template is None:
                raise ShardDataError(f"rank {self.rank} could read no sample of its shards in epoch {epoch}; see "
                                     f"the warnings above for the damaged shards.")
            produced += 1
            self.stats.padded_samples += self.batch_size
            if produced > skip:
                self.progress.batches += 1
                yield Batch([f"pad:{k.removeprefix('pad:')}" for k in template.keys], template.captions,
                            template.metas, torch.zeros_like(template.weights), template.pixels,
                            template.latent_mean, template.latent_std, template.hidden, template.pooled,
                            template.shards, template.masks)

    def _filler_template(self, epoch: int) -> Batch | None:
        """A batch to copy as weight-0 filler, decoded in this process from the epoch's first readable sample."""
        for index in epoch_shard_order(len(self.manifest.shards), self.seed, epoch):
            for sample in self.stream(epoch, [index]):
                if "bad" not in sample:
                    return _padded([sample], self.batch_size)
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
            # A chunk is a batch's worth of records; two chunks ahead per worker keep a batch ready.
            self._loader = DataLoader(MailboxStream(self._mailbox, self.batch_size), batch_size=None,
                                      num_workers=workers, persistent_workers=True, prefetch_factor=2,
                                      worker_init_fn=ignore_in_worker)
        return self._loader

    def close(self) -> None:
        """Stop the worker processes and remove the mailbox."""
        self._loader = None  # its iterator shuts the workers down when collected
        if self._remove_mailbox is not None:
            self._remove_mailbox()
            self._mailbox = None

    def _record(self, batch: Batch) -> None:
        progress = self.progress
        progress.batches += 1
        real = batch.real_samples
        if real:
            progress.consumed += progress.last
            progress.last = [key for _, key in real]
            for shard, key in real:
                progress.mark_used(shard, key)

    def _batches(self, samples: Iterable[dict[str, Any]], skip: int) -> Iterator[Batch]:
        """Single-bucket batches in arrival order, then each bucket's last one completed with padding.

        Batches of placeholders (consumed before a resume) come out as an empty marker batch that the
        caller drops; the last consumed batch is decoded, so a padding template exists after a resume."""
        pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        self._template = None
        count = 0

        def emit(group: list[dict[str, Any]], padded: bool) -> Batch:
            nonlocal count
            count += 1
            placeholders = [s for s in group if s.get("placeholder")]
            if placeholders:
                if count > skip:
                    raise ShardDataError(f"rank {self.rank}: the checkpoint's data position does not match the "
                                         f"shards (sample {placeholders[0]['key']} was consumed before the resume but "
                                         f"falls in batch {count}); resume with the same data and world size.")
                return _PLACEHOLDER_BATCH
            batch = _padded(group, self.batch_size) if padded else collate(group, [1.0] * len(group))
            if padded:
                self.stats.padded_samples += int((batch.weights == 0).sum())
            self._template = batch
            return batch

        for sample in samples:
            if "bad" in sample:
                self.stats.bad(sample["bad"])
                bad = sample["bad"]
                if bad.sample_key and bad.sample_key not in self.progress.bad:
                    self.progress.bad.append(bad.sample_key)
                    self.progress.mark_used(bad.shard, bad.sample_key)
                continue
            self.stats.placeholders += bool(sample.get("placeholder"))
            group = pending.setdefault(_shape_key(sample), [])
            group.append(sample)
            if len(group) == self.batch_size:
                pending[_shape_key(sample)] = []
                yield emit(group, padded=False)
        for group in pending.values():  # the last, incomplete batch of each bucket
            if group:
                yield emit(group, padded=True)


_PLACEHOLDER_BATCH = Batch([], [], [], torch.zeros(0))
