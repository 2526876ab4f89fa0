"""Reading WebDataset tar shards sample by sample, turning a damaged shard into records instead of crashes.

Shards are opened with WebDataset's ``gopen`` (local paths, ``pipe:`` commands, http). Members are
grouped into samples by key: the member name up to the first dot of its base name, as WebDataset does.
A truncated or corrupt tar ends that shard with one ``BadData`` record naming the shard and the last key
read; the reader then moves on. Nothing sleeps and nothing is retried silently.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.gopen import gopen


@dataclass(frozen=True)
class BadData:
    shard: str
    key: str
    reason: str


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext if dot else ""


def tar_samples(url: str, shard_name: str) -> Iterator[dict[str, Any] | BadData]:
    """Samples (``{"__key__", "__shard__", ext: bytes, ...}``) of one shard, then a BadData if it is damaged."""
    current: dict[str, Any] | None = None
    last_key = "(start of shard)"
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any failure to open is reported as bad data of this shard
        yield BadData(shard_name, "", f"cannot open {url!r}: {exc}")
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard_name}
                current[ext] = data
                last_key = key
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # The sample being assembled may be incomplete: it is dropped with the rest of the shard.
        yield BadData(shard_name, last_key, f"damaged tar after sample '{last_key}': {type(exc).__name__}: {exc}")
    finally:
        stream.close()
