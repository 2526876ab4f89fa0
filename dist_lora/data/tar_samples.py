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
    sample_key: str = ""  # the expanded sample key (``key#repeat``) when one sample failed to decode


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext if dot else ""


def tar_samples(url: str, shard_name: str, expected: int | None = None,
                required: tuple[str, ...] = ("json", "txt")) -> Iterator[dict[str, Any] | BadData]:
    """Samples (``{"__key__", "__shard__", ext: bytes, ...}``) of one shard, and a BadData for each damage.

    A tar cut short at a header boundary reads as a clean end of archive, so the count is checked
    against ``expected`` (from the manifest) too. A sample missing a ``required`` member is bad data."""
    current: dict[str, Any] | None = None
    last_key, complete = "(start of shard)", 0
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any failure to open is reported as bad data of this shard
        yield BadData(shard_name, "", f"cannot open {url!r}: {exc}")
        return

    def finished(sample: dict[str, Any]) -> dict[str, Any] | BadData:
        missing = [ext for ext in required if ext not in sample]
        if missing:
            return BadData(shard_name, sample["__key__"], f"incomplete sample: no {', '.join(missing)} member")
        return sample

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
                    item = finished(current)
                    complete += not isinstance(item, BadData)
                    yield item
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard_name}
                current[ext] = data
                last_key = key
        last = finished(current) if current is not None else None
        if isinstance(last, dict):
            complete += 1
            yield last
        if expected is not None and complete < expected:
            yield BadData(shard_name, last_key, f"shard ended after {complete} of {expected} samples: the tar is "
                                                f"truncated or damaged")
        elif isinstance(last, BadData):
            yield last
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # The sample being assembled may be incomplete: it is dropped with the rest of the shard.
        yield BadData(shard_name, last_key, f"damaged tar after sample '{last_key}': {type(exc).__name__}: {exc}")
    finally:
        stream.close()
