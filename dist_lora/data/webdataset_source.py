"""Existing WebDataset / img2dataset shards as a `dist-lora prepare` source (`--webdataset URLS`).

The URLs are webdataset's own: brace ranges (``shards/{00000..00127}.tar``), ``::``-separated lists,
``pipe:`` commands, local paths and the remote schemes webdataset opens. Each shard is read as it streams,
through webdataset's tar iterator and key grouping, so a sample is what webdataset itself would yield:
its image member (jpg, png, webp, ...) and its caption from the ``.txt`` member or a key of the ``.json``
member (img2dataset writes both). A sample's path in the output is ``<shard name>/<key>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_lora.data.kohya import DatasetFolderError, SourceImage
from dist_lora.data.prepare_sources import PlannedSample, held_out
from dist_lora.data.shard_writer import sample_key

# Members taken as the image, in this order of preference (webdataset lower-cases the extensions).
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_MEMBER = "txt"
WEBDATASET_FOLDER = "webdataset"  # the folder name the samples' tags are counted under (the manifest's tag_frequency)


def _local_path(url: str) -> Path | None:
    """The file a URL names, or None when it is a command or a remote object."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return Path(url.removeprefix("file://").removeprefix("file:"))


def _shard_name(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class WebDatasetSource:
    pattern: str  # as given: braces, '::' lists, pipe: commands
    urls: tuple[str, ...]
    caption_key: str = ""  # a (dotted) key of each sample's .json; "": its .txt member

    @classmethod
    def open(cls, pattern: str, caption_key: str = "") -> WebDatasetSource:
        """The shards ``pattern`` names; local ones must exist (checked before any model or output is touched)."""
        from webdataset.shardlists import expand_urls

        urls = tuple(url for url in expand_urls(pattern) if url)
        if not urls:
            raise DatasetFolderError(f"--webdataset '{pattern}' names no shard.")
        missing = [url for url in urls if (path := _local_path(url)) is not None and not path.is_file()]
        if missing:
            raise DatasetFolderError(f"--webdataset '{pattern}': {len(missing)} of its {len(urls)} shard(s) do not "
                                     f"exist, first '{missing[0]}'; check the path and the {{first..last}} range.")
        return cls(pattern, urls, caption_key)

    def prefixes(self, taken: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """The name each shard's samples are filed under: its file name without .tar, numbered where two
        shards share a name or a name is ``taken`` (a --reg concept folder)."""
        names = [_shard_name(url) for url in self.urls]
        clash = {n for n in names if names.count(n) > 1} | set(taken)
        return [f"{i:05d}_{n}" if n in clash else n for i, n in enumerate(names)]

    def samples(self, shards: list[int], prefixes: list[str], val_fraction: float) -> Iterator[PlannedSample]:
        """The samples of the shards at ``shards`` (indices into ``urls``), read as they stream."""
        for index in shards:
            used: dict[str, set[str]] = {"train": set(), "val": set()}
            for sample in self._shard_samples(self.urls[index]):
                relative = f"{prefixes[index]}/{sample['__key__']}"
                split = "val" if val_fraction > 0 and held_out(relative, val_fraction) else "train"
                yield self._planned(sample, relative, split, sample_key(relative, used[split]))

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        try:
            yield from tarfile_samples([{"url": url}])
        except Exception as exc:  # noqa: BLE001 - webdataset raises what the stream, tarfile or pipe raised
            raise DatasetFolderError(f"--webdataset shard '{url}' cannot be read: {type(exc).__name__}: "
                                     f"{exc.args[0] if exc.args else exc}") from exc

    def _planned(self, sample: dict[str, Any], relative: str, split: str, key: str) -> PlannedSample:
        url = sample["__url__"]
        image_member = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
        caption, problem = self._caption(sample)
        image = SourceImage(Path(url), relative, WEBDATASET_FOLDER, "", 1, None, caption_text=caption,
                            data=sample[image_member] if image_member else None)
        if image_member is None:
            members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
            return PlannedSample(image, split, key, f"no image member ({', '.join(IMAGE_MEMBERS[:4])}, ...) in "
                                                    f"{url}; its members: {members}")
        return PlannedSample(image, split, key, warning=problem)

    def _caption(self, sample: dict[str, Any]) -> tuple[str, str]:
        """The sample's caption and a warning ('' if none) when it has none."""
        if not self.caption_key:
            raw = sample.get(CAPTION_MEMBER)
            if raw is None:
                return "", "no .txt caption member: trained with an empty caption"
            return _decoded(raw)
        raw = sample.get("json")
        if raw is None:
            return "", f"no .json member to take the caption key '{self.caption_key}' from: empty caption"
        try:
            value: Any = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return "", f".json member is not JSON ({exc}): empty caption"
        for part in self.caption_key.split("."):
            if not isinstance(value, dict) or part not in value:
                return "", f".json member has no key '{self.caption_key}': empty caption"
            value = value[part]
        if value is None:
            return "", f".json key '{self.caption_key}' is null: empty caption"
        if isinstance(value, list):  # a list of tags
            return ", ".join(str(v) for v in value), ""
        return str(value), ""


def _decoded(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8-sig"), ""
    except UnicodeDecodeError as exc:
        return raw.decode("cp1252", errors="replace"), (f".txt caption is not UTF-8 (byte {exc.start}); decoded as "
                                                        f"Windows-1252, check the text")
