"""Running the trainer as real processes: one plain process, or two under `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from dist_lora.config import config_from_dict, to_toml
from dist_lora.data.prepare import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[2]


def free_port() -> str:
    """A TCP port no process listens on now, from the OS: tests run side by side (pytest-xdist) must not
    share a rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def identical_samples_shards(root: Path, count: int = 16, shard_size: int = 4) -> Path:
    """``count`` copies of one image and caption: every split of a global batch holds the same data,
    so runs with different process layouts must compute the same gradients."""
    folder = root / "src" / "1_same"
    folder.mkdir(parents=True)
    image = Image.new("RGB", (128, 128), (240, 240, 230))
    image.paste((200, 30, 30), (30, 40, 90, 100))
    for i in range(count):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("dlsks, red square")
    prepare_dataset(root / "src", root / "shards", PrepareOptions(resolution=128, shard_size=shard_size))
    return root / "shards"


def run_training(raw: dict, tmp: Path, *, launch: str | None = None, env: dict[str, str] | None = None,
                 timeout: int = 600, check: bool = True, script: Path | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """Write ``raw`` as a recipe and train: in one process, or with ``launch`` (a file in launch/) on 2.
    ``script`` runs that file instead of `python -m dist_lora.train` (with the same arguments)."""
    recipe = tmp / f"recipe_{len(list(tmp.glob('recipe_*.toml')))}.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    entry = [str(script)] if script is not None else ["-m", "dist_lora.train"]
    train_args = [*entry, "--config", str(recipe)]
    if launch is None:
        cmd = [sys.executable, *train_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / launch),
               "--main_process_port", free_port(), *train_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def zero3_everything_partitioned(folder: Path) -> Path:
    """ZeRO-3 that keeps no parameter whole between steps: by default it keeps small ones (under 1e5
    elements, which covers a tiny model's adapters) gathered, and writes to those take another path."""
    ds_config = folder / "zero3_partitioned.json"
    ds_config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}))
    launch = folder / "zero3_partitioned.yaml"
    launch.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds_config}\n"
                      f"  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 2\nuse_cpu: false\n")
    return launch
