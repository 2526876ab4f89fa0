"""Validation loss: a held-out split, fixed draws per sample, the same on 1 and 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_lora.config import config_from_dict
from dist_lora.data.cache import CacheOptions, cache_dataset
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.synthetic import write_shapes_dataset
from dist_lora.train.trainer import RunSetupError, train
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import run_training
from tests.integration.test_sampling import TOLERANCE, _pixels

pytestmark = pytest.mark.slow
SAMPLE_PROMPTS = ["a dlsks red square --w 64 --h 64 --s 3 --d 4", "a dlsks blue circle --w 64 --h 64 --s 3 --ss ddim"]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split")
    write_shapes_dataset(root / "src", images=24, repeats=2)
    report = prepare_dataset(root / "src", root / "shards", PrepareOptions(resolution=64, shard_size=4,
                                                                           val_fraction=0.25))
    assert report.validation is not None and report.validation.accepted > 0
    assert report.accepted + report.validation.accepted == 24
    return root / "shards"


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (run / "validation.jsonl").read_text().splitlines())]


def _raw(model: Path, shards: Path, out: Path) -> dict:
    # Sample images at the end too: the 2-process run below also checks they match the 1-process ones.
    return tiny_train_config(model, shards, out, training={"max_steps": 4, "batch_size": 2},
                             validation={"shards": str(shards / "val"), "every_steps": 2, "batch_size": 3},
                             output={"save_every_steps": 2}, checkpoint={"every_steps": 2},
                             sample={"prompts": SAMPLE_PROMPTS}, logging={"tensorboard": True})


def test_held_out_split_has_no_overlap_and_keeps_one_repeat(split: Path) -> None:
    train_sources = set(json.loads((split / "sources.json").read_text())["sources"])
    val_sources = set(json.loads((split / "val" / "sources.json").read_text())["sources"])
    assert train_sources and val_sources and not train_sources & val_sources
    val = json.loads((split / "val" / "manifest.json").read_text())
    assert val["num_samples_with_repeats"] == val["num_samples"] == len(val_sources)


def test_same_adapter_same_loss_and_one_process_equals_two(tiny_models: dict[str, Path], split: Path,
                                                           tmp_path: Path) -> None:
    import shutil

    model = tiny_models["sd15"]
    one = train(config_from_dict(_raw(model, split, tmp_path / "one")))
    ones = _losses(one.run_dir)
    assert [s for s, _ in ones] == [2, 4] and ones[0][1] != ones[1][1]  # training moved the loss
    best = json.loads((one.run_dir / "summary.json").read_text())["best_validation"]
    step, loss = min(ones, key=lambda r: (r[1], r[0]))
    assert best["step"] == step and best["val_loss"] == loss
    expected = one.run_dir / ("adapter.safetensors" if step == 4 else "adapter-step00000002.safetensors")
    assert best["file"] == str(expected) and expected.is_file()
    # The step-4 adapter evaluated again, by runs resumed at its checkpoint with nothing left to train: on
    # 1 process the same number bit for bit, on 2 processes (each evaluating half) the same up to the
    # order of the float sum.
    shutil.copytree(one.run_dir, tmp_path / "two")
    raw = _raw(model, split, tmp_path / "one")
    raw["checkpoint"]["resume"] = "latest"
    raw["output"]["overwrite"] = True
    train(config_from_dict(raw))
    assert _losses(one.run_dir) == [*ones, ones[-1]]
    raw["output"]["dir"] = str(tmp_path / "two")
    run_training(raw, tmp_path, launch="cpu_2proc.yaml")
    (_, again), = [r for r in _losses(tmp_path / "two")[2:]]
    assert abs(again - ones[-1][1]) <= 1e-6 * ones[-1][1], (again, ones)
    # Sample images of the same adapter, each rank rendering one prompt: the 1-process set (up to float
    # reduction order: the processes run single-threaded, this one multi-threaded).
    for name in ("00-a-dlsks-red-square.png", "01-a-dlsks-blue-circle.png"):
        diff = _pixels(one.run_dir / "samples" / "step-00000004" / name) - \
            _pixels(tmp_path / "two" / "samples" / "step-00000004" / name)
        assert np.abs(diff).max() <= TOLERANCE
    # TensorBoard, read back with its own reader: training scalars and validation loss equal the logs,
    # and the sample images are there.
    events = EventAccumulator(str(one.run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [json.loads(x)["loss"] for x in (one.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [round(v, 5) for v in losses]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val/loss")][:2] == [(s, round(v, 6)) for s, v in ones]
    assert {"samples/00", "samples/01", "samples/grid"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/00")][:1] == [4]


def test_validation_set_of_another_family_is_refused_before_loading(tiny_models: dict[str, Path], split: Path,
                                                                    tmp_path: Path) -> None:
    cache_dataset(split / "val", tmp_path / "val_sdxl", CacheOptions(model=str(tiny_models["sdxl"])))
    raw = _raw(tiny_models["sd15"], split, tmp_path / "run")
    raw["validation"]["shards"] = str(tmp_path / "val_sdxl")
    with pytest.raises(RunSetupError, match=r"validation\.shards '.*val_sdxl' was cached with a sdxl model"):
        train(config_from_dict(raw))
    raw["validation"]["shards"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match=r"validation\.shards '.*nowhere' is not a folder"):
        train(config_from_dict(raw))
