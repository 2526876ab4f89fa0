"""`dist-lora cache`: every rank encodes its share of the shards with the frozen VAE and text encoders.

Run it as the training runs (`accelerate launch -m dist_lora.cli cache ...`, `srun`, or one process).
Shard ``i`` goes to rank ``i % world_size``. Each output shard keeps every member of the input shard
and adds ``vae.safetensors`` (the VAE posterior's mean and std, unscaled, so the trainer draws the same
latents as it would online) and ``te.safetensors`` (SD 1.x/2.x: the hidden states; SDXL: both encoders'
penultimate hidden states concatenated, and the pooled output of the second).

The output is assembled in ``.<out>.partial`` beside ``out``: each finished shard is renamed into it
with a small record of its counts, so a run stopped half-way resumes with the shards not yet done.
Rank 0 writes the manifest when every shard is there and renames the folder into place.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from dist_lora import parallel
from dist_lora.data.manifest import CacheInfo, Manifest, ShardDataError, cached_manifest, shard_entry, write_manifest
from dist_lora.data.prepare import REPORT_NAME
from dist_lora.data.stream import LATENT_FLIP_MEMBER, LATENT_MEMBER, TEXT_MEMBER, decode_image, pixels_to_unit_range
from dist_lora.data.tar_samples import BadData, tar_samples
from dist_lora.models.load import Components, inspect_model_source, load_components
from dist_lora.models.text import MAX_TOKEN_LENGTHS, TextEncoding, encode_prompts, tokenize
from dist_lora.utils.files import check_writable_dir, write_text_atomic
from dist_lora.utils.stop_signals import Preempted, StopSignals, signal_hook

CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CacheOptions:
    model: str
    config_dir: str = ""
    text: bool = True  # also cache text-encoder outputs
    dtype: str = "fp32"  # storage precision of the cached tensors
    batch_size: int = 8
    overwrite: bool = False
    clip_skip: int = 1  # kohya's text-encoding options; training refuses cached text made otherwise
    max_token_length: int = 75
    flip_aug: bool = False  # also cache the mirrored images' latents (on anyway for subsets with flip_aug)


@dataclass
class CacheReport:
    shards_done: int = 0  # by this rank
    shards_resumed: int = 0  # found finished from an earlier, interrupted run
    samples: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)


def _check(src: Path, out: Path, opts: CacheOptions) -> Manifest:
    manifest = Manifest.read(src)
    if manifest.cache is not None:
        raise ShardDataError(f"'{src}' already holds cached outputs (from '{manifest.cache.model}'); cache the "
                             f"output of `dist-lora prepare` instead.")
    if manifest.uncropped_samples:
        raise ShardDataError(f"'{src}' holds {manifest.uncropped_samples} sample(s) prepared for random cropping "
                             f"(--random-crop or a subset's random_crop), cropped anew every epoch, so their latents "
                             f"cannot be cached; train from the images, or prepare without random cropping.")
    if opts.dtype not in CACHE_DTYPES:
        raise ShardDataError(f"cache dtype {opts.dtype!r} is not one of {sorted(CACHE_DTYPES)}.")
    if opts.batch_size < 1:
        raise ShardDataError(f"cache batch size {opts.batch_size} must be at least 1.")
    if out.resolve() == src.resolve():
        raise ShardDataError(f"cache output '{out}' is the input folder; write the cached shards to a new folder.")
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"cache output '{out}' exists; choose another folder or pass --overwrite.")
    if opts.max_token_length not in MAX_TOKEN_LENGTHS or opts.clip_skip < 1:
        raise ShardDataError(f"cache text encoding clip_skip = {opts.clip_skip}, max_token_length = "
                             f"{opts.max_token_length}: clip_skip is at least 1, max_token_length one of "
                             f"{', '.join(map(str, MAX_TOKEN_LENGTHS))}.")
    check_writable_dir(out.parent)
    source = inspect_model_source(opts.model, opts.config_dir)  # a bad model path fails before any loading
    if source.family == "sdxl" and opts.text and opts.clip_skip != 1:
        raise ShardDataError(f"--clip-skip {opts.clip_skip} has no meaning for SDXL (conditioned on the penultimate "
                             f"layer of both text encoders); leave it at 1.")
    return manifest


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _batches(items: Iterator[dict[str, Any] | BadData], size: int,
             bad: list[dict[str, str]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, BadData):
            bad.append({"shard": item.shard, "key": item.key, "reason": item.reason})
            continue
        try:
            item["__pixels__"] = decode_image(item.get("png") or item.get("jpg") or b"")
            item["__meta__"] = json.loads(item["json"])
        except Exception as exc:  # noqa: BLE001 - an undecodable sample is reported and left out
            bad.append({"shard": item["__shard__"], "key": item["__key__"], "reason": f"{type(exc).__name__}: {exc}"})
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Encoder:
    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, text: bool,
                 flip: bool) -> None:
        self.c, self.device, self.dtype, self.text, self.flip = components, device, dtype, text, flip

    @torch.no_grad()
    def encode(self, batch: list[dict[str, Any]]) -> list[dict[str, bytes]]:
        vae = self.c.vae
        assert vae is not None
        pixels = pixels_to_unit_range(torch.stack([s["__pixels__"] for s in batch]), self.device,
                                      next(vae.parameters()).dtype)
        dist = vae.encode(pixels).latent_dist
        mirrored = vae.encode(pixels.flip(-1)).latent_dist if self.flip else None
        hidden = pooled = None
        if self.text:
            ids = tokenize(self.c.tokenizers, [s["txt"].decode("utf-8") for s in batch], self.c.text_encoding)
            hidden, pooled = encode_prompts(self.c.text_encoders, ids, self.c.family, self.c.text_encoding)
        members = []
        for i in range(len(batch)):
            latent = {"mean": dist.mean[i].to(self.dtype).contiguous().cpu(),
                      "std": dist.std[i].to(self.dtype).contiguous().cpu()}
            added = {LATENT_MEMBER: save_safetensors_bytes(latent)}
            if mirrored is not None:
                added[LATENT_FLIP_MEMBER] = save_safetensors_bytes(
                    {"mean": mirrored.mean[i].to(self.dtype).contiguous().cpu(),
                     "std": mirrored.std[i].to(self.dtype).contiguous().cpu()})
            if hidden is not None:
                text = {"hidden": hidden[i].to(self.dtype).contiguous().cpu()}
                if pooled is not None:
                    text["pooled"] = pooled[i].to(self.dtype).contiguous().cpu()
                added[TEXT_MEMBER] = save_safetensors_bytes(text)
            members.append(added)
        return members


def _cache_shard(url: str, entry: dict[str, Any], staging: Path, encoder: _Encoder, batch_size: int) -> dict[str, Any]:
    """Write one cached shard (atomically) and return its counts."""
    name = entry["file"]
    tmp = staging / f".{name}.tmp"
    counts: dict[str, Any] = {**shard_entry(name, entry.get("bucket")), "bad": []}
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for batch in _batches(tar_samples(url, name, int(entry["samples"])), batch_size, counts["bad"]):
            for sample, added in zip(batch, encoder.encode(batch), strict=True):
                key = sample["__key__"]
                for ext, data in sample.items():
                    if not ext.startswith("__"):
                        _add_member(tar, f"{key}.{ext}", data)
                for ext, data in added.items():
                    _add_member(tar, f"{key}.{ext}", data)
                meta = sample["__meta__"]
                counts["samples"] += 1
                counts["samples_with_repeats"] += int(meta.get("repeats", 1))
                counts["reg_samples"] += int(bool(meta.get("is_reg")))
    write_text_atomic(staging / f".{name}.done.json", json.dumps(counts, ensure_ascii=False))
    tmp.rename(staging / name)
    return counts


OPTIONS_NAME = ".cache_options.json"


def _options_record(src: Path, opts: CacheOptions) -> dict[str, Any]:
    return {"src": str(src.resolve()), "model": opts.model, "text": opts.text, "dtype": opts.dtype,
            "clip_skip": opts.clip_skip, "max_token_length": opts.max_token_length, "flip_aug": opts.flip_aug}


def _claim(staging: Path, src: Path, opts: CacheOptions) -> None:
    """Record the settings of this run in the staging folder, unless an interrupted run left its own."""
    if not (staging / OPTIONS_NAME).is_file():
        write_text_atomic(staging / OPTIONS_NAME, json.dumps(_options_record(src, opts)))


def cache_dataset(src: str | Path, out: str | Path, opts: CacheOptions) -> CacheReport:
    src, out = Path(src), Path(out)
    manifest = _check(src, out, opts)  # every input checked before the models load
    if any(options.get("flip") for options in manifest.subset_options("augment")):
        opts = replace(opts, flip_aug=True)
    urls = manifest.urls()  # raises for missing shard files
    world = parallel.process_world()
    staging = out.with_name(f".{out.name}.partial")
    if world.is_main:
        staging.mkdir(parents=True, exist_ok=True)
        _claim(staging, src, opts)
    parallel.wait_for_everyone()
    options = json.loads((staging / OPTIONS_NAME).read_text(encoding="utf-8"))
    if options != _options_record(src, opts):
        raise ShardDataError(f"'{staging}' holds a cache run interrupted with other settings ({options}); remove "
                             f"it or repeat those settings.")

    report = CacheReport()
    mine = [i for i in range(len(manifest.shards)) if i % world.size == world.rank]
    todo = [i for i in mine if not (staging / f".{manifest.shards[i]['file']}.done.json").is_file()
            or not (staging / manifest.shards[i]["file"]).is_file()]
    report.shards_resumed = len(mine) - len(todo)
    components = load_components(opts.model, config_dir=opts.config_dir, load_text=opts.text)
    components.text_encoding = TextEncoding(opts.clip_skip, opts.max_token_length)
    assert components.vae is not None
    for module in [components.vae, *components.text_encoders]:
        module.requires_grad_(False).eval().to(world.device)
    encoder = _Encoder(components, world.device, CACHE_DTYPES[opts.dtype], opts.text, opts.flip_aug)
    signals = StopSignals.current()
    # Rounds of one shard per rank, the same count on every rank, so that after each round all ranks can
    # agree whether a stop signal arrived: a finished shard is kept and the next run resumes after it.
    rounds = -(-len(manifest.shards) // world.size)
    for round_index in range(rounds):
        if round_index < len(mine) and mine[round_index] in todo:
            i = mine[round_index]
            counts = _cache_shard(urls[i], manifest.shards[i], staging, encoder, opts.batch_size)
            report.shards_done += 1
            report.samples += counts["samples"]
            report.bad += counts["bad"]
            signal_hook(f"cache_shard:{report.shards_done}")
        if parallel.any_rank(bool(signals.received)) and round_index < rounds - 1:
            raise Preempted(0, str(staging), signals.received or "another rank was signalled",
                            message=f"caching stopped ({signals.received or 'another rank was signalled'}) after "
                                    f"{report.shards_done} shard(s) of this rank; finished shards are kept in "
                                    f"'{staging}', run the same command again to continue")
    parallel.wait_for_everyone()

    if world.is_main:
        _finish(manifest, staging, out, opts, components)
    parallel.wait_for_everyone()
    return report


def _finish(manifest: Manifest, staging: Path, out: Path, opts: CacheOptions, components: Components) -> None:
    shards, bad = [], []
    for entry in manifest.shards:
        record = staging / f".{entry['file']}.done.json"
        if not record.is_file():
            raise ShardDataError(f"cache: shard {entry['file']} was not written by any rank; run the command again "
                                 f"(finished shards are kept in '{staging}').")
        counts = json.loads(record.read_text(encoding="utf-8"))
        bad += counts.pop("bad")
        if counts["samples"]:
            shards.append(counts)
        else:
            (staging / entry["file"]).unlink()
        record.unlink()
    assert components.vae is not None
    cache = CacheInfo(latents=True, text=opts.text, model=opts.model, family=components.family, dtype=opts.dtype,
                      scaling_factor=float(components.vae.config.scaling_factor), clip_skip=opts.clip_skip,
                      max_token_length=opts.max_token_length, flipped=opts.flip_aug)
    (staging / OPTIONS_NAME).unlink()
    write_manifest(staging, cached_manifest(manifest, shards, cache))
    (staging / REPORT_NAME).write_text(json.dumps({"cache_bad_samples": bad}, indent=1, ensure_ascii=False),
                                       encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
