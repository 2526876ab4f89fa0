"""Shared fixtures: tiny pipelines and a prepared shard set, built once per test session."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test workers run side by side: one compute thread each (and in the processes they start), else their
    # OpenMP thread pools spin against each other for the same cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dist_lora.models.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_pipeline(arch, root / arch) for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images x 2 repeats = 48 samples per epoch, in 4 shards of 6 images."""
    from dist_lora.data.prepare import PrepareOptions, prepare_dataset
    from dist_lora.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("data")
    write_shapes_dataset(root / "src", images=24, repeats=2)
    prepare_dataset(root / "src", root / "shards", PrepareOptions(resolution=128, shard_size=6))
    return root / "shards"


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two buckets and uneven shards: 11 squares x 2 repeats (shards of 4, 4, 3) + 5 wide 4:1 x 1 (4, 1)."""
    from PIL import Image

    from dist_lora.data.prepare import PrepareOptions, prepare_dataset

    root = tmp_path_factory.mktemp("uneven")
    for folder, count, size in (("2_square", 11, (80, 80)), ("1_wide", 5, (256, 64))):
        (root / "src" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (i * 20, 255 - i * 20, 90)).save(root / "src" / folder / f"{folder[2]}{i:02d}.png")
            (root / "src" / folder / f"{folder[2]}{i:02d}.txt").write_text(f"dlsks, {folder[2:]}, tone {i}")
    prepare_dataset(root / "src", root / "shards", PrepareOptions(resolution=128, shard_size=4, min_side=32,
                                                                 workers=1))
    return root / "shards"


def expected_sample_keys(shards: Path) -> Counter[str]:
    """Every sample key of a prepared folder times its repeats (``key#r``), read from the tars directly."""
    manifest = json.loads((shards / "manifest.json").read_text())
    keys: Counter[str] = Counter()
    for shard in manifest["shards"]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    keys.update(f"{member.name[: -len('.json')]}#{r}" for r in range(meta["repeats"]))
    return keys


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a prepared folder's tars: key -> {member extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def tiny_train_config(model: Path, shards: Path, out: Path, **sections: dict[str, object]) -> dict[str, dict]:
    raw: dict[str, dict] = {
        "model": {"pretrained": str(model)},
        "data": {"shards": str(shards), "num_workers": 0},
        "network": {"rank": 4, "alpha": 2.0},
        "optimizer": {"lr": 1e-2},
        "training": {"batch_size": 4, "max_steps": 4, "seed": 1},
        "output": {"dir": str(out), "name": "adapter", "save_precision": "fp32"},
        # TensorBoard is on by default; tests about it turn it on (it costs an import per process).
        "logging": {"progress_bar": False, "log_every": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-Slurm tests first. Under pytest-xdist they form one group that one worker runs alone, for
    about a third of the suite's time; started first, it runs while the other worker takes the rest,
    instead of last with the other worker idle."""
    items.sort(key=lambda item: "slurm" not in item.path.parts)
