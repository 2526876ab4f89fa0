"""The main process's last step of `dist-lora prepare`: every process's shards and records (``part.json``)
merged into one dataset folder, shards numbered in process order, with one manifest, sources.json and
report.json per split and the audit over all images."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dist_lora.data.audit import AuditItem, audit
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.manifest import new_manifest, write_manifest
from dist_lora.data.prepare_encode import PART_NAME
from dist_lora.data.prepare_options import PrepareOptions, PrepareReport
from dist_lora.data.shard_writer import SOURCES_NAME
from dist_lora.data.stream import MASK_MEMBER

REPORT_NAME = "report.json"


def _read_part(folder: Path) -> dict[str, Any]:
    path = folder / PART_NAME
    if not path.is_file():
        raise DatasetFolderError(f"'{path}' is missing: the process that prepared '{folder.name}' did not finish, or "
                                 f"its folder is not on a file system the main process sees.")
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def merge_shares(staging: Path, shares: list[Path], opts: PrepareOptions, *, source: str, started: float,
                 subsets: list[dict[str, Any]], tokenizer: Any) -> PrepareReport:
    """Merge the share folders ``shares`` (in process order) into ``staging``; they are removed afterwards."""
    parts = [_read_part(folder) for folder in shares]
    report = _merge_split(staging, [(folder, part["train"]) for folder, part in zip(shares, parts, strict=True)],
                          opts, source, started, subsets)
    if any(part["val"]["report"]["found"] for part in parts):
        report.validation = _merge_split(staging / "val", [(folder / "val", part["val"])
                                                           for folder, part in zip(shares, parts, strict=True)],
                                         opts, source, started, subsets)
    # In path order, so that the audit's groups come in the same order however many processes prepared.
    report.processes = [part["train"]["report"]["found"] + part["val"]["report"]["found"] for part in parts]
    items = sorted((AuditItem(**item) for part in parts for item in part["audited"]), key=lambda i: (i.path, i.split))
    report.audit = audit(items, trigger=opts.trigger, max_distance=opts.audit_distance, tokenizer=tokenizer,
                         max_tokens=opts.max_token_length)
    (staging / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    for folder in shares:
        shutil.rmtree(folder)
    return report


def _merge_split(dest: Path, parts: list[tuple[Path, dict[str, Any]]], opts: PrepareOptions, source: str,
                 started: float, subsets: list[dict[str, Any]]) -> PrepareReport:
    dest.mkdir(parents=True, exist_ok=True)
    report = PrepareReport()
    shards: list[dict[str, Any]] = []
    sources: dict[str, dict[str, Any]] = {}
    tag_frequency: dict[str, Counter[str]] = {}
    for folder, part in parts:
        renamed = {}
        for entry in part["shards"]:
            name = f"train-{len(shards):06d}.tar"
            os.replace(folder / entry["file"], dest / name)
            renamed[entry["file"]] = name
            shards.append({**entry, "file": name})
        for relative, record in part["sources"].items():
            sources[relative] = {**record, "shard": renamed[record["shard"]]}
        for folder_name, counts in part["tag_frequency"].items():
            tag_frequency.setdefault(folder_name, Counter()).update(counts)
        report.add_counts(PrepareReport(**part["report"]))
    assert report.found == report.accepted + len(report.rejected)
    if report.accepted == 0:
        raise DatasetFolderError(f"'{source}': no image could be used; see the reasons: {report.rejected[:3]}")
    _write_metadata(dest, opts, shards, tag_frequency, sources, report, started, subsets)
    return report


def _write_metadata(staging: Path, opts: PrepareOptions, shards: list[dict[str, Any]],
                    tag_frequency: dict[str, Counter[str]], sources: dict[str, dict[str, Any]],
                    report: PrepareReport, started: float, subsets: list[dict[str, Any]]) -> None:
    fingerprint = opts.encoding_fingerprint()
    resolutions = opts.resolutions()
    manifest = new_manifest(resolution=max(resolutions), bucket_spec=fingerprint["buckets"],
                            image_format=opts.image_format, trigger=opts.trigger, num_samples=report.accepted,
                            shards=shards, tag_frequency={k: dict(v) for k, v in tag_frequency.items()},
                            subsets=subsets, masks=any(MASK_MEMBER in e["members"] for e in sources.values()),
                            uncropped=sum(bool(e["geometry"].get("uncropped")) for e in sources.values()),
                            wildcard=opts.wildcard)
    if len(resolutions) > 1:  # several bucket sets; samples and shards carry their own buckets
        manifest["resolutions"] = resolutions
    report.shards = len(shards)
    report.samples_with_repeats = manifest["num_samples_with_repeats"]
    report.buckets = {name: c["samples"] for name, c in manifest["buckets"].items()}
    report.seconds = time.perf_counter() - started
    write_manifest(staging, manifest)
    (staging / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    (staging / SOURCES_NAME).write_text(json.dumps({"fingerprint": fingerprint, "sources": sources},
                                                   ensure_ascii=False), encoding="utf-8")
