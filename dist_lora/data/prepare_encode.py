"""One process's share of `dist-lora prepare`: its images encoded (or reused from the previous output) in
windows as they arrive, and written into its own single-bucket shards with the records the merge needs.

Images are decoded in spawned worker processes a window at a time, so a stream of shard samples is never
held in memory whole; small sets are encoded in-process (starting workers costs about a second)."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

from dist_lora.data.audit import AuditItem, file_hash
from dist_lora.data.buckets import Bucket, BucketSpec, bucket_set
from dist_lora.data.encode import EncodeJob, encode_image
from dist_lora.data.kohya import read_captions
from dist_lora.data.prepare_options import PrepareOptions, PrepareReport
from dist_lora.data.prepare_sources import PlannedSample, image_options
from dist_lora.data.shard_writer import BucketShardSink, PreviousOutput, source_identity

PARALLEL_THRESHOLD = 32  # fewer images than this to encode are decoded in-process
PART_NAME = "part.json"  # a process's record of what it wrote, read by the merge
SPLITS = ("train", "val")

Encoded = tuple[dict[str, bytes], dict[str, Any]] | str  # members and geometry, or why it was rejected


class _Encoder:
    """Encodes windows of jobs, in a pool of spawned workers once a window is large enough."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, jobs: list[EncodeJob]) -> Iterable[Encoded]:
        if self.workers <= 1 or (self._pool is None and len(jobs) < PARALLEL_THRESHOLD):
            return map(encode_image, jobs)
        if self._pool is None:
            # Spawned (not forked) workers: the caller may hold threads (torch, tokenizers) that fork would copy.
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.map(encode_image, jobs, chunksize=max(1, min(32, len(jobs) // (self.workers * 4))))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _windows(items: Iterable[PlannedSample], size: int) -> Iterator[list[PlannedSample]]:
    iterator = iter(items)
    while window := list(islice(iterator, size)):
        yield window


class _Window:
    """A window of items with what is known of each: its source identity and its encoding (or, for the
    ones being encoded, an iterator of results still coming)."""

    def __init__(self, items: list[PlannedSample]) -> None:
        self.items = items
        self.results: list[Encoded | None] = [None] * len(items)
        self.identities: list[dict[str, Any]] = [{}] * len(items)
        self.todo: list[tuple[int, EncodeJob]] = []
        self.outputs: Iterable[Encoded] = ()

    def finish(self) -> Iterator[tuple[PlannedSample, dict[str, Any], Encoded]]:
        for (index, _), result in zip(self.todo, self.outputs, strict=True):
            self.results[index] = result
        for item, identity, result in zip(self.items, self.identities, self.results, strict=True):
            assert result is not None
            yield item, identity, result


def _encoded(items: Iterable[PlannedSample], previous: dict[str, PreviousOutput], opts: PrepareOptions,
             reports: dict[str, PrepareReport]) -> Iterator[tuple[PlannedSample, dict[str, Any], Encoded]]:
    """Each item with its source identity and its encoding, in order. The next window is handed to the
    workers before the current one is written, so they do not wait for the writer."""
    workers = opts.workers or os.cpu_count() or 1
    encoder = _Encoder(workers)
    bucket_sets: dict[BucketSpec, list[Bucket]] = {}

    def start(items: list[PlannedSample]) -> _Window:
        window = _Window(items)
        for index, item in enumerate(items):
            if item.rejected:
                window.results[index] = item.rejected
                continue
            image = item.image
            window.identities[index] = source_identity(image)
            options = image_options(image, opts)
            hit = previous[item.split].lookup(image, window.identities[index], options)
            if hit is not None:
                window.results[index] = hit
                reports[item.split].reused += 1
                continue
            own = opts.for_image(image)
            spec = own.bucket_spec()
            buckets = bucket_sets.setdefault(spec, bucket_set(spec))
            window.todo.append((index, EncodeJob(str(image.path), own.effective_min_side, opts.max_pixels, buckets,
                                                 opts.image_format, options, spec, image.data)))
            reports[item.split].encoded += 1
        window.outputs = encoder([job for _, job in window.todo])  # a pool's map submits every job at once
        return window

    try:
        pending: _Window | None = None
        for items_of_window in _windows(items, max(4 * PARALLEL_THRESHOLD, 16 * workers)):
            current = start(items_of_window)
            if pending is not None:
                yield from pending.finish()
            pending = current
        if pending is not None:
            yield from pending.finish()
    finally:
        encoder.close()


class _SplitWriter:
    """The shards and records of one split (train or val) of this process's share."""

    def __init__(self, folder: Path, opts: PrepareOptions, report: PrepareReport) -> None:
        self.folder, self.opts, self.report = folder, opts, report
        self.sink: BucketShardSink | None = None
        self.sources: dict[str, dict[str, Any]] = {}
        self.tag_frequency: dict[str, Counter[str]] = {}

    def add(self, item: PlannedSample, identity: dict[str, Any], result: Encoded, audited: list[AuditItem]) -> None:
        image, opts = item.image, self.opts
        self.report.found += 1
        if isinstance(result, str):
            self.report.rejected.append({"path": image.relative, "reason": result})
            return
        members, geometry = result
        caption, raw_caption, warning = read_captions(image, opts.trigger)
        for text in (item.warning, warning):
            if text:
                self.report.warnings.append({"path": image.relative, "warning": text})
        audited.append(AuditItem(image.relative, "reg" if image.is_reg else item.split,
                                 geometry.get("phash") or file_hash(image.path, image.data), raw_caption))
        placement = {k: v for k, v in geometry.items() if k != "phash"}  # the hash stays in sources.json
        meta = {**placement, "repeats": image.repeats, "folder": image.folder, "source": image.relative,
                "is_reg": image.is_reg, **({"subset": image.subset} if image.subset is not None else {})}
        encoded = list(members)
        members = {**members, "txt": caption.encode("utf-8"),
                   "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        if self.sink is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.sink = BucketShardSink(self.folder, opts.shard_size)
        shard = self.sink.add(item.key, members, tuple(geometry["bucket"]), image.repeats, image.is_reg)
        self.sources[image.relative] = {"shard": shard, "key": item.key, "ext": opts.image_format,
                                        "members": encoded, **identity, "geometry": geometry,
                                        "options": image_options(image, opts)}
        self.report.accepted += 1
        tags = [t.strip() for t in caption.replace("\n", ",").split(",") if t.strip()]  # every wildcard line
        self.tag_frequency.setdefault(image.folder, Counter()).update(tags)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def record(self) -> dict[str, Any]:
        report = self.report
        return {"shards": self.sink.shards if self.sink is not None else [], "sources": self.sources,
                "tag_frequency": {k: dict(v) for k, v in self.tag_frequency.items()},
                "report": {"found": report.found, "accepted": report.accepted, "rejected": report.rejected,
                           "warnings": report.warnings, "encoded": report.encoded, "reused": report.reused}}


def prepare_share(items: Iterable[PlannedSample], folder: Path, out: Path, opts: PrepareOptions) -> None:
    """Encode ``items`` into ``folder`` (its training shards, and val/ for held-out images), reusing unchanged
    images of the previous output ``out``; write what it did to ``folder/part.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = opts.encoding_fingerprint()
    previous = {"train": PreviousOutput(out, fingerprint), "val": PreviousOutput(out / "val", fingerprint)}
    reports = {split: PrepareReport() for split in SPLITS}
    writers = {"train": _SplitWriter(folder, opts, reports["train"]),
               "val": _SplitWriter(folder / "val", opts, reports["val"])}
    audited: list[AuditItem] = []
    try:
        for item, identity, result in _encoded(items, previous, opts, reports):
            writers[item.split].add(item, identity, result, audited)
    finally:
        for writer in writers.values():
            writer.close()
        for old in previous.values():
            old.close()
    record = {**{split: writers[split].record() for split in SPLITS}, "audited": [asdict(a) for a in audited]}
    (folder / PART_NAME).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
