"""The worker side of the loader: one rank's shards read, repeated, shuffled and decoded.

Runs in DataLoader worker processes. Everything it yields is a sample, a placeholder (a sample
consumed before a resume, passed on undecoded) or a ``{"bad": BadData}`` record, sent to the training
process in packed chunks of consecutive records; batching, padding and counting happen there
(``shards.py``).
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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


def _expand_repeats(items: Iterator[dict[str, Any] | BadData]) -> Iterator[dict[str, Any] | BadData]:
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
            yield {**item, "__key__": f"{item['__key__']}#{r}", "__source_key__": item["__key__"], "meta": meta}


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
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
    captions: CaptionPolicy = CaptionPolicy(CaptionTransform())
    use_latents: bool = False  # read cached VAE posteriors instead of decoding images
    use_text: bool = False  # read cached text-encoder outputs instead of captions for encoding
    # On resume: samples consumed before the checkpoint pass as placeholders (nothing decoded), and
    # samples that failed to decode then are reported bad again without a second try.
    skip_keys: frozenset[str] = frozenset()
    bad_keys: frozenset[str] = frozenset()
    # On a resume on another layout of ranks: samples the stopped run trained on this epoch, left out.
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
    """One rank's samples for one epoch; DataLoader workers split the rank's shards between them."""

    def __init__(self, shards: list[tuple[str, str, int]], spec: StreamSpec) -> None:
        super().__init__()
        self.shards, self.spec = shards, spec  # (url, shard file name, samples in the manifest)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[worker::workers]
        spec = self.spec
        rng = random.Random(f"samples/{spec.seed}/{spec.epoch}/{spec.rank}/{worker}")
        raw = (item for url, name, expected in mine for item in tar_samples(url, name, expected))
        for item in _buffer_shuffle(_expand_repeats(raw), spec.shuffle_buffer, rng):
            if isinstance(item, BadData):
                yield {"bad": item}
                continue
            key = item["__key__"]
            if key in spec.drop_keys:
                continue
            if key in spec.skip_keys:
                yield {"key": key, "meta": item["meta"], "shard": item["__shard__"], "placeholder": True}
                continue
            try:
                if key in spec.bad_keys:
                    raise ValueError("failed to decode before the checkpoint this run resumed from")
                yield decode_sample(item, spec)
            except Exception as exc:  # noqa: BLE001 - any undecodable member is bad data, reported and skipped
                yield {"bad": BadData(item["__shard__"], item["__source_key__"], f"{type(exc).__name__}: {exc}",
                                      sample_key=key)}


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
                           "skip_keys": sorted(spec.skip_keys), "bad_keys": sorted(spec.bad_keys),
                           "drop_keys": sorted(spec.drop_keys)}}
        write_text_atomic(self.path, json.dumps(record, ensure_ascii=False))

    def read(self) -> RankShardStream:
        record = json.loads(self.path.read_text(encoding="utf-8"))
        raw = record["spec"]
        spec = StreamSpec(**{**raw, "captions": CaptionPolicy.from_json(raw["captions"], CaptionTransform),
                             "augment": AugmentPolicy.from_json(raw["augment"], Augment),
                             "skip_keys": frozenset(raw["skip_keys"]), "bad_keys": frozenset(raw["bad_keys"]),
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


class MailboxStream(IterableDataset):  # type: ignore[type-arg]
    """The dataset of a persistent-worker DataLoader: each epoch's iteration reads the mailbox anew and
    yields its records packed ``chunk_size`` at a time (``unpack_chunk`` restores them in order)."""

    def __init__(self, mailbox: EpochMailbox, chunk_size: int) -> None:
        super().__init__()
        self.mailbox, self.chunk_size = mailbox, chunk_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        for record in self.mailbox.read():
            chunk.append(record)
            if len(chunk) == self.chunk_size:
                yield pack_chunk(chunk)
                chunk = []
        if chunk:
            yield pack_chunk(chunk)
