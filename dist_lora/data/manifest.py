"""The shard manifest (``manifest.json``): the one module that knows its schema.

`dist-lora prepare` writes it, `dist-lora cache` rewrites it with what the cache added, and the loader,
the planners and the trainer read it.

Schema (format ``dist_lora.shards/2``): ``resolution``, ``bucket_spec``, ``image_format``, ``trigger``,
``num_samples``, ``num_reg_samples``, ``num_samples_with_repeats``, ``buckets`` (per-bucket totals),
``tag_frequency`` (per source folder), ``subsets`` (from a dataset config: each subset's source and
the training-time options it set; absent for a plain folder), ``masks`` (true when samples carry a
``mask.png``), ``uncropped_samples`` (stored for random cropping), ``wildcard_captions`` (captions keep
every line, for wildcards), ``cache`` (absent until cached) and
``shards``: one entry per tar, each holding a single bucket: ``file``, ``bucket`` [width, height], ``samples``,
``samples_with_repeats``, ``reg_samples``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

from dist_lora.errors import DistLoraError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dist_lora.shards/2"


class ShardDataError(DistLoraError):
    """The prepared data cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class CacheInfo:
    """What `dist-lora cache` added to the shards, and from which model."""

    latents: bool
    text: bool
    model: str
    family: str
    dtype: str
    scaling_factor: float
    clip_skip: int = 1  # how the text outputs were encoded (kohya's options; older caches: the defaults)
    max_token_length: int = 75
    flipped: bool = False  # the mirrored images' latents are cached too (flip_aug)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CacheInfo | None:
        if not data:
            return None
        return cls(bool(data["latents"]), bool(data["text"]), str(data["model"]), str(data["family"]),
                   str(data["dtype"]), float(data["scaling_factor"]), int(data.get("clip_skip", 1)),
                   int(data.get("max_token_length", 75)), bool(data.get("flipped", False)))


@dataclass(frozen=True)
class Manifest:
    root: Path
    resolution: int
    shards: list[dict[str, Any]]
    tag_frequency: dict[str, dict[str, int]]
    trigger: str = ""
    cache: CacheInfo | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path, key: str = "data.shards") -> Manifest:
        """The manifest of a prepared folder; ``key`` names the setting the folder came from in errors."""
        root = Path(folder)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise ShardDataError(f"{key} '{root}' is not a folder; expected the output of `dist-lora prepare`.")
        if not path.is_file():
            raise ShardDataError(f"{key} '{root}' has no {MANIFEST_NAME}; run `dist-lora prepare SRC {root}`.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ShardDataError(f"'{path}' is not valid JSON: {exc}") from exc
        if data.get("format") != MANIFEST_FORMAT:
            raise ShardDataError(f"'{path}' has format {data.get('format')!r}; expected {MANIFEST_FORMAT!r}. "
                                 f"Re-run `dist-lora prepare` to rebuild the shards.")
        return cls(root, int(data["resolution"]), list(data["shards"]), dict(data.get("tag_frequency", {})),
                   str(data.get("trigger", "")), CacheInfo.from_json(data.get("cache")), data)

    @property
    def wildcard_captions(self) -> bool:
        """Prepared with --enable-wildcard: captions keep every line, one chosen (and {a|b} expanded) per epoch."""
        return bool(self.raw.get("wildcard_captions"))

    @property
    def has_masks(self) -> bool:
        """Some samples carry a loss mask (prepare --alpha-mask / --mask-dir, or a subset's)."""
        return bool(self.raw.get("masks"))

    @property
    def uncropped_samples(self) -> int:
        """Samples stored uncropped, to be cropped at a random offset when loaded (prepare --random-crop)."""
        return int(self.raw.get("uncropped_samples", 0))

    @property
    def subsets(self) -> list[dict[str, Any]]:
        """Per subset of a dataset config (a sample's ``meta["subset"]`` indexes it): where it came from and the
        training-time options it set; [] for a plain folder."""
        return list(self.raw.get("subsets", []))

    def subset_options(self, name: str) -> list[dict[str, Any]]:
        """Per subset, the options of kind ``name`` ("captions", "augment") its dataset config set."""
        return [dict(s.get(name, {})) for s in self.subsets]

    @property
    def num_samples_with_repeats(self) -> int:
        return sum(int(s["samples_with_repeats"]) for s in self.shards)

    def urls(self, pattern: str = "") -> list[str]:
        """Where each manifest shard is read from: the folder, or ``pattern`` (brace-expanded, ``pipe:`` allowed).

        With a pattern, the i-th URL must name the i-th shard's file, so a pattern that lists the shards
        in another order, or misses some, is an error rather than silently wrong counts.
        """
        if not pattern:
            urls = [str(self.root / s["file"]) for s in self.shards]
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise ShardDataError(f"'{self.root / MANIFEST_NAME}' lists shards that are missing: {missing[:3]}.")
            return urls
        urls = list(expand_urls(pattern))
        if len(urls) != len(self.shards):
            raise ShardDataError(f"data.shard_urls {pattern!r} expands to {len(urls)} URLs but "
                                 f"'{self.root / MANIFEST_NAME}' lists {len(self.shards)} shards.")
        for url, shard in zip(urls, self.shards, strict=True):
            if shard["file"] not in url:
                raise ShardDataError(f"data.shard_urls: URL {url!r} does not name shard {shard['file']!r} of the "
                                     f"manifest; list the shards in the manifest's order, e.g. "
                                     f"'.../train-{{000000..{len(self.shards) - 1:06d}}}.tar'.")
        return urls


def shard_entry(file: str, bucket: tuple[int, int] | list[int] | None) -> dict[str, Any]:
    """A new, empty shard entry; writers add to its counts as they add samples."""
    return {"file": file, "bucket": list(bucket) if bucket is not None else None, "samples": 0,
            "samples_with_repeats": 0, "reg_samples": 0}


def bucket_counts(shards: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The manifest's per-bucket totals, from its per-shard entries (each shard holds one bucket)."""
    per_bucket: dict[str, dict[str, int]] = {}
    for shard in shards:
        counts = per_bucket.setdefault(f"{shard['bucket'][0]}x{shard['bucket'][1]}",
                                       {"samples": 0, "samples_with_repeats": 0, "shards": 0})
        counts["samples"] += shard["samples"]
        counts["samples_with_repeats"] += shard["samples_with_repeats"]
        counts["shards"] += 1
    return dict(sorted(per_bucket.items()))


def new_manifest(*, resolution: int, bucket_spec: Any, image_format: str, trigger: str, num_samples: int,
                 shards: list[dict[str, Any]], tag_frequency: dict[str, dict[str, int]],
                 subsets: list[dict[str, Any]] | None = None, masks: bool = False,
                 uncropped: int = 0, wildcard: bool = False) -> dict[str, Any]:
    """The manifest `dist-lora prepare` writes."""
    return {**({"subsets": subsets} if subsets else {}), **({"masks": True} if masks else {}),
            **({"wildcard_captions": True} if wildcard else {}),
            **({"uncropped_samples": uncropped} if uncropped else {}),
        "format": MANIFEST_FORMAT,
        "resolution": resolution,
        "bucket_spec": bucket_spec,
        "image_format": image_format,
        "trigger": trigger,
        "num_samples": num_samples,
        "num_reg_samples": sum(s["reg_samples"] for s in shards),
        "num_samples_with_repeats": sum(s["samples_with_repeats"] for s in shards),
        "buckets": bucket_counts(shards),
        "shards": shards,
        "tag_frequency": tag_frequency,
    }


def cached_manifest(source: Manifest, shards: list[dict[str, Any]], cache: CacheInfo) -> dict[str, Any]:
    """``source``'s manifest for its cached copy: the cached shards (those that kept any sample) and the
    cache's record."""
    data = dict(source.raw)
    for shard in shards:
        if shard.get("bucket") is None:
            shard["bucket"] = [source.resolution, source.resolution]
    data.update(shards=shards, num_samples=sum(s["samples"] for s in shards),
                num_reg_samples=sum(s["reg_samples"] for s in shards),
                num_samples_with_repeats=sum(s["samples_with_repeats"] for s in shards),
                buckets=bucket_counts(shards), cache=asdict(cache))
    return data


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
