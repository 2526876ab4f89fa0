"""Data-path throughput: is the loader fast enough that a GPU never waits on it?

    .venv/bin/python benchmarks/data_throughput.py [--images 120] [--out benchmarks/results/data_throughput_cpu.json]

Measured on this machine's CPU cores, with 1 and 2 worker processes:
- prepare: decode a ~1024^2 source JPEG, pick its SDXL bucket, resize + crop, encode (one-time cost),
  timed by the command's own report;
- loader, images: the training loader over prepared SDXL-bucket JPEG shards (decode + to-tensor,
  repeats, shuffle, single-bucket batches of 4);
- loader, cached: the same loader over shards holding SDXL-sized cached latents (4x128x128) and
  text-encoder outputs (77x2048 + 1280 pooled) in fp16, which skips image decoding.
The per-core rates are compared with what one H100 consumes training an SDXL LoRA at 1024^2
(DESIGN.md section 7: 55.6 img/s ceiling without gradient checkpointing, 37.7 with it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_bytes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_lora.data.manifest import MANIFEST_NAME  # noqa: E402
from dist_lora.data.shards import ShardLoader  # noqa: E402
from dist_lora.data.stream import LATENT_MEMBER, TEXT_MEMBER  # noqa: E402

H100_SDXL_IMG_PER_S = {"no_gradient_checkpointing": 55.6, "gradient_checkpointing": 37.7}
BATCH = 4


def write_sources(folder: Path, count: int) -> None:
    """Photo-like JPEGs (smooth gradients plus grain) around 1024^2, in several aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768), (1100, 1000)]
    folder.mkdir(parents=True)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
        grain = rng.normal(0, 12, size=(h, w, 3))
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"photo {i}, gradient, grain")


def prepare_rate(src: Path, out: Path, workers: int, count: int) -> float:
    """Images per second of `dist-lora prepare`, from its own report (pool start-up included).

    It runs as the command line does, in a fresh process: spawned decode workers import the main
    module again, and this script's main module imports torch, which the CLI's does not."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_lora.cli", "prepare", str(src), str(out), "--resolution", "1024",
           "--image-format", "jpg", "--shard-size", "8", "--workers", str(workers)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return count / float(json.loads((out / "report.json").read_text())["seconds"])


def loader_rate(shards: Path, workers: int, **kwargs: object) -> tuple[float, int]:
    loader = ShardLoader(shards, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=workers,
                         shuffle_buffer=16, **kwargs)  # type: ignore[arg-type]
    started = time.perf_counter()
    samples = sum(len(batch.real_keys) for batch in loader.epoch(0))
    if loader.stats.bad_records:
        raise RuntimeError(f"{loader.stats.bad_records} bad records in '{shards}': the benchmark data is broken")
    return samples / (time.perf_counter() - started), samples


def write_cached_copy(shards: Path, out: Path) -> None:
    """The prepared shards plus SDXL-sized cached members (as `dist-lora cache --dtype fp16` writes)."""
    out.mkdir()
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    gen = torch.Generator().manual_seed(0)
    for shard in manifest["shards"]:
        bucket_w, bucket_h = shard["bucket"]
        with tarfile.open(shards / shard["file"]) as src, tarfile.open(out / shard["file"], "w") as dst:
            members = src.getmembers()
            for i, member in enumerate(members):
                dst.addfile(member, src.extractfile(member))
                key = member.name.split(".")[0]
                if i + 1 < len(members) and members[i + 1].name.split(".")[0] == key:
                    continue  # a sample's members stay together: add the cached ones after its last
                latent = {"mean": torch.randn(4, bucket_h // 8, bucket_w // 8, generator=gen).half(),
                          "std": torch.rand(4, bucket_h // 8, bucket_w // 8, generator=gen).half()}
                text = {"hidden": torch.randn(77, 2048, generator=gen).half(),
                        "pooled": torch.randn(1280, generator=gen).half()}
                for name, tensors in ((LATENT_MEMBER, latent), (TEXT_MEMBER, text)):
                    data = save_bytes(tensors)
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
    manifest["cache"] = {"latents": True, "text": True, "model": "synthetic SDXL-sized", "family": "sdxl",
                         "dtype": "fp16", "scaling_factor": 0.13025}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput_cpu.json"))
    args = parser.parse_args()
    random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="dl_data_bench_"))
    try:
        write_sources(tmp / "src" / "2_photo", args.images)
        result: dict[str, object] = {
            "benchmark": "data_throughput",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
            "device": "cpu",
            "versions": {"torch": torch.__version__, "pillow": Image.__version__, "numpy": np.__version__},
            "setup": {"source_images": args.images, "source_sizes": "1024x1024 .. 1344x768 JPEG q90",
                      "buckets": "SDXL (base 1024, sides 512..2048, step 64)", "repeats": 2, "batch_size": BATCH},
        }
        rates: dict[str, dict[str, float]] = {"prepare": {}, "loader_images": {}, "loader_cached": {}}
        for workers in (1, 2):
            rates["prepare"][f"{workers}_workers"] = prepare_rate(tmp / "src", tmp / "shards", workers, args.images)
        write_cached_copy(tmp / "shards", tmp / "cached")
        for workers in (1, 2):
            rate, samples = loader_rate(tmp / "shards", workers)
            rates["loader_images"][f"{workers}_workers"] = rate
            rate, _ = loader_rate(tmp / "cached", workers, use_latents=True, use_text=True)
            rates["loader_cached"][f"{workers}_workers"] = rate
        result["samples_per_epoch"] = samples
        result["samples_per_s"] = rates
        per_core = {name: r["1_workers"] for name, r in rates.items()}
        result["samples_per_s_per_core"] = per_core
        result["h100_sdxl_consumption_img_per_s"] = H100_SDXL_IMG_PER_S
        ceiling = H100_SDXL_IMG_PER_S["no_gradient_checkpointing"]
        result["cores_per_h100_at_ceiling"] = {name: round(ceiling / rate, 2) for name, rate in per_core.items()}
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
