"""`dist-lora demo`: the whole product on a tiny SDXL pipeline, on CPU, in a couple of minutes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dist_lora.config import config_from_dict
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.synthetic import write_shapes_dataset
from dist_lora.models.tiny import TINY_RESOLUTION, write_tiny_pipeline
from dist_lora.train.trainer import TrainResult, train

MARKER = ".dist_lora_demo"


def _claim_workdir(workdir: Path) -> None:
    """The demo owns its folder: reuse one it made before, refuse to clobber anything else."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise FileExistsError(f"'{workdir}' exists and was not made by the demo; pass another --out folder.")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by dist-lora demo\n", encoding="utf-8")


def run_demo(workdir: str | Path = "demo_output", *, steps: int = 200, arch: str = "sdxl",
             extra_overrides: dict[str, dict[str, object]] | None = None) -> TrainResult:
    workdir = Path(workdir)
    _claim_workdir(workdir)
    t0 = time.perf_counter()
    print(f"[demo] building a tiny {arch} pipeline in {workdir / 'model'}")
    write_tiny_pipeline(arch, workdir / "model")  # type: ignore[arg-type]
    print("[demo] writing a procedural kohya-style dataset (coloured shapes, trigger word 'dlsks')")
    write_shapes_dataset(workdir / "dataset")
    report = prepare_dataset(workdir / "dataset", workdir / "shards",
                             PrepareOptions(resolution=TINY_RESOLUTION, shard_size=8))
    print(f"[demo] prepare: {report.summary()}")
    raw: dict[str, dict[str, object]] = {
        "model": {"pretrained": str(workdir / "model")},
        "data": {"shards": str(workdir / "shards"), "num_workers": 1},
        "network": {"rank": 8, "alpha": 8.0},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"type": "cosine", "warmup_steps": 5},
        "training": {"batch_size": 4, "max_steps": steps, "seed": 0},
        "output": {"dir": str(workdir / "run"), "name": "demo_lora"},
        # The base model's images before the first step, and the trained adapter's after the last.
        "sample": {"prompts": ["dlsks, red square --d 1 --s 8", "dlsks, blue circle --d 2 --s 8"],
                   "at_start": True},
    }
    for section, values in (extra_overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    result = train(config_from_dict(raw))
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    print(f"[demo] adapter:          {result.adapter_path}")
    print(f"[demo] resolved config:  {result.config_path}")
    print(f"[demo] metrics:          {result.metrics_path}")
    print(f"[demo] sample images:    {result.run_dir / 'samples'} (grid.png per round; TensorBoard: "
          f"{result.run_dir / 'tensorboard'})")
    first = sum(result.losses[:5]) / len(result.losses[:5])
    last = sum(result.losses[-5:]) / len(result.losses[-5:])
    print(f"[demo] loss: start {result.first_loss:.4f} (mean of first 5 steps {first:.4f}) -> "
          f"end {result.last_loss:.4f} (mean of last 5 steps {last:.4f})")
    return result
