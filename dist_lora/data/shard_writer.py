"""Writing prepared samples into single-bucket tar shards, and finding the encoded image of an unchanged
source in an earlier run's shards (what makes a re-run of `dist-lora prepare` incremental)."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Any

from dist_lora.data.kohya import SourceImage
from dist_lora.data.manifest import shard_entry

SOURCES_NAME = "sources.json"  # what each sample was made from; lets a re-run reuse unchanged images


def sample_key(relative: str, used: set[str]) -> str:
    """A key for the sample of ``relative`` not in ``used`` (and added to it)."""
    # WebDataset splits a member name at its first dot, so keys carry none.
    base = relative.rsplit(".", 1)[0].replace(".", "_")
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def source_identity(image: SourceImage) -> dict[str, Any]:
    """What must be unchanged for an earlier run's encoded copy of ``image`` to be reused: a file's size and
    modification time; a shard member's size and checksum (a stream has no modification time)."""
    if image.data is not None:
        return {"size": len(image.data), "crc32": zlib.crc32(image.data)}
    stat = image.path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical inputs give byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class BucketShardSink:
    """Writes samples into ``train-%06d.tar`` files of at most ``shard_size`` samples, one bucket per shard."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []
        self._open: dict[tuple[int, int], tuple[tarfile.TarFile, dict[str, Any]]] = {}

    def add(self, key: str, members: dict[str, bytes], bucket: tuple[int, int], repeats: int, is_reg: bool) -> str:
        current = self._open.get(bucket)
        if current is None or current[1]["samples"] >= self.shard_size:
            if current is not None:
                current[0].close()
            entry = shard_entry(f"train-{len(self.shards):06d}.tar", bucket)
            tar = tarfile.open(self.folder / entry["file"], "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self.shards.append(entry)
            current = self._open[bucket] = (tar, entry)
        tar, entry = current
        for ext, data in members.items():
            _add_member(tar, f"{key}.{ext}", data)
        entry["samples"] += 1
        entry["samples_with_repeats"] += repeats
        entry["reg_samples"] += int(is_reg)
        return str(entry["file"])

    def close(self) -> None:
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()


class PreviousOutput:
    """Encoded images of an earlier run into the same output folder, reusable when the source is unchanged."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.sources: dict[str, dict[str, Any]] = {}
        self._tars: dict[str, tarfile.TarFile] = {}
        path = out / SOURCES_NAME
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return  # unreadable: encode everything again
        if data.get("fingerprint") == fingerprint:
            self.sources = data.get("sources", {})

    def lookup(self, image: SourceImage, identity: dict[str, Any],
               options: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]] | None:
        entry = self.sources.get(image.relative)
        if entry is None or any(entry.get(k) != v for k, v in identity.items()) \
                or entry.get("options", {}) != options or "mask" in options:  # a mask file may have changed
            return None
        try:
            tar = self._tars.get(entry["shard"])
            if tar is None:
                tar = self._tars[entry["shard"]] = tarfile.open(self.out / entry["shard"])  # noqa: SIM115
            members = {}
            for ext in entry.get("members", [entry["ext"]]):
                member = tar.extractfile(f"{entry['key']}.{ext}")
                if member is None:
                    return None
                members[ext] = member.read()
            return members, entry["geometry"]
        except (OSError, KeyError, tarfile.TarError):
            return None

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()
