"""The data position at cluster scale, without images: manifests of S shards x K samples.

    .venv/bin/python -m benchmarks.scale_sim [--out benchmarks/results/scale_sim_cpu.json]

For 10M and 100M samples (shards of 1,000) on 8, 64, 512 and 4,096 ranks (each with 4 DataLoader workers,
or fewer where the shards would not give every reader one), one rank half-way through an epoch:

- ``plan_s``: seconds of ``plan_epoch`` on one rank (the shard order, the heap assignment of every
  rank's shards, the step count), which every rank runs at the start of every epoch;
- ``position_bytes``: the rank's data-position file as a checkpoint writes it (JSON), and
  ``checkpoint_position_bytes`` all ranks' together (each rank writes its own; none is gathered);
- ``resume_read_samples``: the most samples a resume reads per reader: the worker re-reads the shard it
  stopped in up to its position (the shuffle buffer never crosses into another shard) and opens no
  shard before it; ``resume_read_bytes`` the same at 178 KB a sample (1024 px JPEG; the figure behind
  "10M samples at 90 % on 8 ranks re-read 200 GB per rank" before this position existed);
- ``relayout_s`` / ``relayout_used_bytes``: a resume on half the ranks: the seconds one new rank takes to
  recompute every old rank's used entries from their positions (replaying each old reader's current
  shard's shuffle on entry indices, reading nothing), and the size of that record, which rank 0 writes
  once per checkpoint for the rest of the epoch;
- ``position_ram_bytes``: Python heap allocated while planning and building the position (tracemalloc).

Goals: plan <= 0.5 s per rank at 4,096 ranks and 100k shards, <= 64 KiB of data position per rank, and a
resume reading at most the shuffle buffer plus one shard per reader.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from dist_lora.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from dist_lora.data.position import EpochProgress
from dist_lora.data.shards import EpochPlan, ShardLoader, assign_shards, plan_epoch

SAMPLES_PER_SHARD = 1000
SAMPLE_BYTES = 178_000
BATCH, SEED, EPOCH, BUFFER = 4, 1, 0, 64
GOALS = {"plan_s": 0.5, "position_bytes": 64 * 1024, "resume_read_samples": SAMPLES_PER_SHARD}


def write_manifest(folder: Path, shards: int) -> None:
    entries = [{"file": f"train-{i:07d}.tar", "bucket": [1024, 1024], "samples": SAMPLES_PER_SHARD,
                "samples_with_repeats": SAMPLES_PER_SHARD, "reg_samples": 0} for i in range(shards)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": MANIFEST_FORMAT, "resolution": 1024, "shards": entries}))


def _urls(shards: int) -> str:
    """Shards that are never read: the benchmark plans and positions only."""
    return f"pipe:false train-{{0000000..{shards - 1:07d}}}.tar"


def half_way(loader: ShardLoader, lanes: int, shard_indices: list[int], steps: int) -> EpochProgress:
    """The position of a rank that took half its batches, its workers taking turns."""
    per_worker = [shard_indices[w::lanes] for w in range(lanes)]
    batches_per_shard = -(-SAMPLES_PER_SHARD // BATCH)
    workers = []
    for w in range(lanes):
        taken = steps // 2 // lanes
        workers.append([min(taken // batches_per_shard, len(per_worker[w]) - 1), taken % batches_per_shard, 0])
    return EpochProgress(EPOCH, steps // 2, loader.layout, workers, (steps // 2) % lanes)


def row(folder: Path, samples: int, ranks: int) -> dict[str, Any]:
    shards = samples // SAMPLES_PER_SHARD
    workers = max(1, min(4, shards // ranks))
    loader = ShardLoader(folder, rank=0, world_size=ranks, batch_size=BATCH, seed=SEED, num_workers=workers,
                         shuffle_buffer=BUFFER, shard_urls=_urls(shards))
    def plan_once() -> EpochPlan:
        return plan_epoch(loader.manifest, seed=SEED, epoch=EPOCH, rank=0, world_size=ranks, batch_size=BATCH,
                          num_workers=workers)

    started = time.perf_counter()
    plan_once()
    plan_s = time.perf_counter() - started  # untraced: tracemalloc slows every allocation
    tracemalloc.start()
    plan = plan_once()
    lanes = max(1, min(workers, len(plan.shard_indices)))
    position = half_way(loader, lanes, plan.shard_indices, plan.steps)
    position_bytes = len(json.dumps(position.rank_json()))
    ram = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Every old rank's position, each from its own shards, then a resume on half the ranks.
    assigned = assign_shards(loader.manifest, SEED, EPOCH, ranks)
    old = [half_way(loader, max(1, min(workers, len(mine))), mine, plan.steps) for mine in assigned]
    new = ShardLoader(folder, rank=0, world_size=max(1, ranks // 2), batch_size=BATCH, seed=SEED,
                      num_workers=workers, shuffle_buffer=BUFFER, shard_urls=_urls(shards))
    started = time.perf_counter()
    used = new._used_by(old)
    relayout_s = time.perf_counter() - started
    return {"samples": samples, "shards": shards, "ranks": ranks, "workers_per_rank": workers,
            "plan_s": round(plan_s, 4), "position_bytes": position_bytes,
            "checkpoint_position_bytes": position_bytes * ranks,
            "resume_read_samples": SAMPLES_PER_SHARD, "resume_read_bytes": SAMPLES_PER_SHARD * SAMPLE_BYTES,
            "relayout_s": round(relayout_s, 3), "relayout_used_bytes": len(json.dumps(used.to_json())),
            "position_ram_bytes": ram,
            "within_goals": plan_s <= GOALS["plan_s"] and position_bytes <= GOALS["position_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/scale_sim_cpu.json")
    parser.add_argument("--samples", default="10000000,100000000")
    parser.add_argument("--ranks", default="8,64,512,4096")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for samples in (int(s) for s in args.samples.split(",")):
            folder = Path(tmp) / str(samples)
            write_manifest(folder, samples // SAMPLES_PER_SHARD)
            for ranks in (int(r) for r in args.ranks.split(",")):
                rows.append(row(folder, samples, ranks))
                print(json.dumps(rows[-1]), flush=True)
    import torch

    result = {"benchmark": "scale_sim", "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "device": "cpu"},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "settings": {"samples_per_shard": SAMPLES_PER_SHARD, "batch_size": BATCH, "shuffle_buffer": BUFFER,
                           "sample_bytes": SAMPLE_BYTES},
              "goals": GOALS, "all_within_goals": all(r["within_goals"] for r in rows), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
