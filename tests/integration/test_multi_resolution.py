"""Several resolutions in one run: an sd-scripts dataset config whose datasets differ in resolution prepares
into one folder with a bucket set per resolution, caches, and trains on 2 processes as on 1, resuming
exactly."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from dist_lora.config import config_from_dict
from dist_lora.data.cache import CacheOptions, cache_dataset
from dist_lora.data.dataset_config import read_dataset_config
from dist_lora.data.manifest import Manifest
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import run_training

pytestmark = pytest.mark.slow

CONFIG = """
[general]
caption_extension = ".txt"
batch_size = 2

[[datasets]]
resolution = 128

  [[datasets.subsets]]
  image_dir = "small"

[[datasets]]
resolution = 192
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "large"
"""


def _images(folder: Path, size: int, colour: tuple[int, int, int]) -> None:
    """Two copies of one picture: within a resolution every sample gives the same gradient, so the runs'
    steps compare whatever the split of a step's samples over processes."""
    folder.mkdir(parents=True)
    image = Image.new("RGB", (size, size), (235, 235, 225))
    image.paste(colour, (size // 4, size // 4, size // 2, size * 3 // 4))
    for i in range(2):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("dlsks, square")


@pytest.fixture(scope="module")
def two_resolutions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multires")
    _images(root / "small", 128, (200, 30, 30))
    _images(root / "large", 192, (30, 30, 200))
    (root / "dataset.toml").write_text(CONFIG)
    spec = read_dataset_config(root / "dataset.toml")
    assert spec.training == {"batch_size": 2} and [s.buckets.get("resolution") for s in spec.subsets] == [128, 192]
    prepare_dataset(None, root / "shards", PrepareOptions(shard_size=2), spec)
    return root / "shards"


def test_one_folder_with_a_bucket_set_per_resolution(two_resolutions: Path, tmp_path: Path) -> None:
    manifest = json.loads((two_resolutions / "manifest.json").read_text())
    assert manifest["resolutions"] == [128, 192] and manifest["resolution"] == 192
    assert {s["file"]: tuple(s["bucket"]) for s in manifest["shards"]} == {"train-000000.tar": (128, 128),
                                                                            "train-000001.tar": (192, 192)}
    assert Manifest.read(two_resolutions).resolution == 192
    # The 192 dataset has no buckets (enable_bucket = false): its own setting, not the 128 one's.
    assert manifest["subsets"][1]["buckets"] == {"resolution": 192, "buckets": False}
    # A re-run reuses every image: each one's bucket set is part of what it was encoded with.
    spec = read_dataset_config(two_resolutions.parent / "dataset.toml")
    report = prepare_dataset(None, two_resolutions, PrepareOptions(shard_size=2), spec)
    assert report.reused == 4 and report.encoded == 0


def test_cache_holds_each_resolutions_latents_and_trains_as_online(tiny_models: dict[str, Path],
                                                                   two_resolutions: Path, tmp_path: Path) -> None:
    model = tiny_models["sd15"]
    report = cache_dataset(two_resolutions, tmp_path / "cached", CacheOptions(model=str(model), batch_size=3))
    assert report.samples == 4 and not report.bad
    shapes = set()
    for tar_path in sorted((tmp_path / "cached").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".vae.safetensors"):
                    latents = load_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                    shapes.add(tuple(next(iter(latents.values())).shape[-2:]))
    assert shapes == {(16, 16), (24, 24)}
    runs = {}
    for name, shards in (("online", two_resolutions), ("cached", tmp_path / "cached")):
        raw = tiny_train_config(model, shards, tmp_path / name, optimizer={"lr": 1e-3},
                                training={"max_steps": 4, "batch_size": 2})
        runs[name] = train(config_from_dict(raw))
    assert torch.allclose(torch.tensor(runs["cached"].losses), torch.tensor(runs["online"].losses), rtol=1e-4)


def _raw(model: Path, shards: Path, out: Path, accumulate: int = 1, **checkpoint: object) -> dict:
    return tiny_train_config(model, shards, out, optimizer={"lr": 1e-3, "max_grad_norm": 0.0},
                             training={"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": accumulate},
                             checkpoint={"every_steps": 1, **checkpoint})


def test_two_processes_equal_one_and_resume_exactly(tiny_models: dict[str, Path], two_resolutions: Path,
                                                    tmp_path: Path) -> None:
    """An epoch is one batch of each resolution. Two processes take one each per step; one process takes
    both, accumulating two micro-batches: the same samples in every step."""
    model = tiny_models["sd15"]
    run_training(_raw(model, two_resolutions, tmp_path / "one", accumulate=2), tmp_path)
    run_training(_raw(model, two_resolutions, tmp_path / "two"), tmp_path, launch="cpu_2proc.yaml")
    one, two = load_file(str(tmp_path / "one" / "adapter.safetensors")), \
        load_file(str(tmp_path / "two" / "adapter.safetensors"))
    moved = max(one[k].abs().max().item() for k in one if "lora_up" in k)
    assert moved > 1e-4
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-6, rtol=1e-4, msg=key)

    stopped = run_training(_raw(model, two_resolutions, tmp_path / "split", stop_at_step=2), tmp_path,
                           launch="cpu_2proc.yaml", check=False)
    assert stopped.returncode != 0 and (tmp_path / "split" / "preempted.json").is_file()
    run_training(_raw(model, two_resolutions, tmp_path / "split", resume="latest"), tmp_path, launch="cpu_2proc.yaml")
    split = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert all(torch.equal(split[k], two[k]) for k in two)
