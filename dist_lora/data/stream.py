"""The worker side of the loader: one rank's shards read, repeated, shuffled, batched and decoded.

Runs in DataLoader worker processes (or in the training process with data.num_workers = 0). Each worker
reads its shards one after another. A shard's samples, expanded by their repeats in shard order, are
its *entries*, numbered from 0; they are shuffled through a buffer that never crosses into the next
shard, by a generator keyed by (seed, epoch, shard), and cut into batches of ``batch_size`` (the last one
of a shard short, to be padded). So a worker's position is the shard it is in and the batches it has
taken from it: a resume reads that one shard again up to its position, decoding nothing it skips, and
opens no shard before it.

What a worker yields are *units*: a batch (its records: samples, or ``{"bad": BadData}`` for an entry
that failed to decode), bad data found outside any batch (a damaged tar), the opening of a shard, and
the end of its stream. Batching across workers, padding and counting happen in the training process
(``shards.py``).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from torch.utils.data import IterableDataset

from dist_lora.data.augment import Augment, AugmentPolicy, Draw, apply, draw
from dist_lora.data.captions import CaptionPolicy, CaptionTransform
from dist_lora.data.tar_samples import BadData, tar_samples
from dist_lora.utils.files import write_text_atomic

LATENT_MEMBER = "vae.safetensors"  # cached VAE posterior: "mean" and "std", unscaled
LATENT_FLIP_MEMBER = "vae_flip.safetensors"  # the same of the mirrored image (cached for flip_aug)
MASK_MEMBER = "mask.png"  # the loss weight of each pixel, 8-bit grey (prepare --alpha-mask / --mask-dir)
TEXT_MEMBER = "te.safetensors"  # cached text-encoder outputs: "hidden" (and "pooled" for SDXL)


def shard_entries(items: Iterator[dict[str, Any] | BadData], dropped: set[int], dropped_keys: frozenset[str],
                   ) -> Iterator[tuple[int, dict[str, Any]] | BadData]:
    """A shard's entries in shard order, ``(entry index, sample)``, without those in ``dropped``; damage
    passes through as BadData (it takes no entry index)."""
    index = 0
    for item in items:
        if isinstance(item, BadData):
            yield item
            continue
        try:
            meta = json.loads(item["json"])
            repeats = int(meta.get("repeats", 1))
        except (KeyError, ValueError, TypeError) as exc:
            yield BadData(item["__shard__"], item["__key__"], f"unreadable json member: {exc}")
            continue
        for r in range(repeats):
            key = f"{item['__key__']}#{r}"
            if index not in dropped and key not in dropped_keys:
                yield index, {**item, "__key__": key, "__source_key__": item["__key__"], "meta": meta}
            index += 1


def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """WebDataset's shuffle buffer: fill to ``size``, then each new item puts out a random one; BadData
    passes straight through. The order depends on the number of items alone, not their contents."""
    buffer: list[Any] = []
    for item in items:
        if isinstance(item, BadData) or size <= 1:
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def shard_rng(seed: int, epoch: int, shard: str) -> random.Random:
    return random.Random(f"samples/{seed}/{epoch}/{shard}")


def expand_runs(runs: list[list[int]]) -> set[int]:
    return {i for start, length in runs for i in range(start, start + length)}


def to_runs(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as [start, length] runs: a compact record of the entries a shard has used."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def taken_entries(entries: int, dropped: set[int], batches: int, batch_size: int, shuffle_buffer: int, seed: int,
                  epoch: int, shard: str) -> set[int]:
    """The entry indices a worker took in its first ``batches`` batches of a shard with ``entries`` entries:
    the stream's shuffle replayed on the indices alone (no shard is read)."""
    order = buffer_shuffle((i for i in range(entries) if i not in dropped), shuffle_buffer,
                           shard_rng(seed, epoch, shard))
    return set(itertools.islice(order, batches * batch_size))


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 tensor [3, H, W].

    Pixels stay 8-bit until they reach the device (see ``pixels_to_unit_range``): a quarter of the
    bytes a float tensor would need to cross from a DataLoader worker to the training process."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_mask(data: bytes) -> torch.Tensor:
    """A mask member -> uint8 tensor [1, H, W]."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("L"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).unsqueeze(0)


def pixels_to_unit_range(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [0, 255] -> ``dtype`` in [-1, 1] on ``device``, the VAE's input range."""
    return pixels.to(device, non_blocking=True).to(dtype).div(127.5).sub(1.0)


@dataclass(frozen=True)
class StreamSpec:
    seed: int
    epoch: int
    rank: int
    shuffle_buffer: int
    batch_size: int = 1
    captions: CaptionPolicy = CaptionPolicy(CaptionTransform())
    use_latents: bool = False  # read cached VAE posteriors instead of decoding images
    use_text: bool = False  # read cached text-encoder outputs instead of captions for encoding
    # A resume: per worker, [shard index in its list, batches of that shard already taken].
    starts: list[list[int]] = field(default_factory=list)
    # Entries an earlier layout of ranks used this epoch, left out: per shard file, [start, length] runs;
    # and by sample key, for positions of checkpoint format 1.
    drop: dict[str, list[list[int]]] = field(default_factory=dict)
    drop_keys: frozenset[str] = frozenset()
    augment: AugmentPolicy = AugmentPolicy(Augment())
    use_masks: bool = False  # every sample gets a "mask" (all 255 where the data holds none)


def decode_sample(sample: dict[str, Any], spec: StreamSpec) -> dict[str, Any]:
    key = sample["__key__"]
    caption = sample["txt"].decode("utf-8")
    transform = spec.captions.for_sample(sample["meta"])
    out: dict[str, Any] = {"key": key, "meta": sample["meta"], "shard": sample["__shard__"],
                           "caption": transform(caption, CaptionTransform.rng(spec.seed, spec.epoch, key), spec.epoch)}
    how = _augmentation(sample["meta"], spec, key)
    if spec.use_latents:
        if how is not None and (how.crop_top_left is not None or how.hue_shift is not None or how.gamma is not None):
            raise ValueError("cached latents cannot be cropped or colour-augmented at load time")
        member = LATENT_FLIP_MEMBER if how is not None and how.flip else LATENT_MEMBER
        if member not in sample:
            raise ValueError(f"no {member} member: cache the dataset again with `dist-lora cache --flip-aug`")
        cached = load_safetensors_bytes(sample[member])
        out["latent_mean"], out["latent_std"] = cached["mean"].float(), cached["std"].float()
    else:
        image_bytes = sample.get("png") or sample.get("jpg")
        if image_bytes is None:
            raise ValueError("no png/jpg member")
        out["pixels"] = decode_image(image_bytes)
    if spec.use_masks:
        if MASK_MEMBER in sample:
            out["mask"] = decode_mask(sample[MASK_MEMBER])
        else:
            height, width = out["pixels"].shape[1:] if "pixels" in out else reversed(sample["meta"]["bucket"])
            out["mask"] = torch.full((1, int(height), int(width)), 255, dtype=torch.uint8)
    if how is not None:
        apply(out, how)
    if spec.use_text:
        text = load_safetensors_bytes(sample[TEXT_MEMBER])
        out["hidden"] = text["hidden"].float()
        if "pooled" in text:
            out["pooled"] = text["pooled"].float()
    return out


def _augmentation(meta: dict[str, Any], spec: StreamSpec, key: str) -> Draw | None:
    """The sample's augmentation this epoch; None when nothing changes it."""
    augment = spec.augment.for_sample(meta)
    room = None
    if meta.get("uncropped"):  # prepared with --random-crop: cropped here
        (resized_h, resized_w), (bucket_w, bucket_h) = meta["resized_size"], meta["bucket"]
        room = (int(resized_h) - int(bucket_h), int(resized_w) - int(bucket_w))
    if not augment.active and room is None:
        return None
    return draw(augment, Augment.rng(spec.seed, spec.epoch, key), room)


class RankShardStream(IterableDataset):  # type: ignore[type-arg]
    """One rank's units for one epoch; DataLoader workers split the rank's shards between them (shard i
    to worker i mod workers)."""

    def __init__(self, shards: list[tuple[str, str, int]], spec: StreamSpec) -> None:
        super().__init__()
        self.shards, self.spec = shards, spec  # (url, shard file name, samples in the manifest)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.worker_units(worker, workers)

    def worker_units(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        mine = self.shards[worker::workers]
        first, done = spec.starts[worker] if worker < len(spec.starts) else (0, 0)
        for position in range(first, len(mine)):
            url, name, expected = mine[position]
            yield {"kind": "opened", "worker": worker, "file": name}
            yield from self._shard_units(worker, position, url, name, expected, done if position == first else 0)
        yield {"kind": "end", "worker": worker}

    def _shard_units(self, worker: int, position: int, url: str, name: str, expected: int,
                     skip: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        entries = shard_entries(tar_samples(url, name, expected), expand_runs(spec.drop.get(name, [])),
                                 spec.drop_keys)
        pending: list[dict[str, Any]] = []
        batch = 0

        def unit(entries_of_batch: list[dict[str, Any]]) -> dict[str, Any]:
            return {"kind": "batch", "worker": worker, "shard": position, "batch": batch,
                    "records": [self._decoded(item) for item in entries_of_batch]}

        for item in buffer_shuffle(entries, spec.shuffle_buffer, shard_rng(spec.seed, spec.epoch, name)):
            if isinstance(item, BadData):
                yield {"kind": "bad", "worker": worker, "records": [{"bad": item}]}
                continue
            pending.append(item[1])
            if len(pending) == spec.batch_size:
                if batch >= skip:  # a batch taken before the resume is passed over, nothing decoded
                    yield unit(pending)
                pending, batch = [], batch + 1
        if pending and batch >= skip:
            yield unit(pending)

    def _decoded(self, item: dict[str, Any]) -> dict[str, Any]:
        try:
            return decode_sample(item, self.spec)
        except Exception as exc:  # noqa: BLE001 - any undecodable member is bad data, reported and skipped
            return {"bad": BadData(item["__shard__"], item["__source_key__"], f"{type(exc).__name__}: {exc}",
                                   sample_key=item["__key__"])}


class EpochMailbox:
    """Where the training process leaves the next epoch's shards and stream settings for workers that
    persist across epochs (they read it when the next epoch's iteration starts). A JSON file in a
    private temporary folder: plain data, nothing executable crosses."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "epoch.json"

    def post(self, stream: RankShardStream) -> None:
        spec = stream.spec
        record = {"shards": [list(s) for s in stream.shards],
                  "spec": {**asdict(spec), "captions": spec.captions.to_json(), "augment": spec.augment.to_json(),
                           "drop_keys": sorted(spec.drop_keys)}}
        write_text_atomic(self.path, json.dumps(record, ensure_ascii=False))

    def read(self) -> RankShardStream:
        record = json.loads(self.path.read_text(encoding="utf-8"))
        raw = record["spec"]
        spec = StreamSpec(**{**raw, "captions": CaptionPolicy.from_json(raw["captions"], CaptionTransform),
                             "augment": AugmentPolicy.from_json(raw["augment"], Augment),
                             "drop_keys": frozenset(raw["drop_keys"])})
        return RankShardStream([(url, name, int(n)) for url, name, n in record["shards"]], spec)


# Each tensor a worker hands to the training process costs that process a file-descriptor exchange with
# the worker (about 1 ms per tensor measured on a 2-core machine, 4 ms a step at batch 4). Workers therefore
# send their records in chunks, the tensors of each name packed into one, and the training process unpacks
# them into views: one exchange per name and chunk.
TENSOR_FIELDS = ("pixels", "latent_mean", "latent_std", "hidden", "pooled", "mask")


def pack_chunk(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Consecutive stream records as one object whose tensors of each name share one flat tensor."""
    plain = [{k: v for k, v in record.items() if k not in TENSOR_FIELDS} for record in records]
    shapes = [{name: tuple(record[name].shape) for name in TENSOR_FIELDS if name in record} for record in records]
    packed = {}
    for name in TENSOR_FIELDS:
        parts = [record[name].reshape(-1) for record in records if name in record]
        if parts:
            packed[name] = torch.cat(parts)
    return {"records": plain, "shapes": shapes, "tensors": packed}


def unpack_chunk(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of ``pack_chunk``, in order, their tensors views of the packed ones."""
    offsets = dict.fromkeys(chunk["tensors"], 0)
    records = []
    for plain, shapes in zip(chunk["records"], chunk["shapes"], strict=True):
        record = dict(plain)
        for name, shape in shapes.items():
            size = math.prod(shape)
            record[name] = chunk["tensors"][name][offsets[name]:offsets[name] + size].view(shape)
            offsets[name] += size
        records.append(record)
    return records


def pack_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """A unit for the hand-off from a worker: its records' tensors packed (``pack_chunk``)."""
    if "records" not in unit:
        return unit
    return {**{k: v for k, v in unit.items() if k != "records"}, "chunk": pack_chunk(unit["records"])}


def unpack_unit(unit: dict[str, Any]) -> dict[str, Any]:
    if "chunk" not in unit:
        return unit
    return {**{k: v for k, v in unit.items() if k != "chunk"}, "records": unpack_chunk(unit["chunk"])}


class MailboxStream(IterableDataset):  # type: ignore[type-arg]
    """The dataset of a persistent-worker DataLoader: each epoch's iteration reads the mailbox anew and
    yields the stream's units, packed (``unpack_unit`` restores them)."""

    def __init__(self, mailbox: EpochMailbox) -> None:
        super().__init__()
        self.mailbox = mailbox

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for unit in self.mailbox.read():
            yield pack_unit(unit)
