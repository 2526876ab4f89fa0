"""Two real processes (accelerate launch, gloo on CPU) train together on disjoint shares of the data."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dist_lora.config import config_from_dict, to_toml
from tests.conftest import expected_sample_keys, tiny_train_config
from tests.integration.distributed_helpers import REPO, free_port


@pytest.mark.slow
def test_two_processes_read_disjoint_shares(tiny_models: dict[str, Path], uneven_shards: Path, tmp_path: Path) -> None:
    """2 ranks x 2 workers over uneven shards of two buckets: every sample (x repeats) exactly once."""
    raw = tiny_train_config(tiny_models["sdxl"], uneven_shards, tmp_path / "run",
                            data={"num_workers": 2}, training={"batch_size": 2, "max_steps": 0, "epochs": 1},
                            logging={"record_sample_keys": True, "comm_stats": True, "log_every": 2})
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", free_port(), "-m", "dist_lora.train", "--config", str(recipe)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "run" / "sample_keys.jsonl").read_text().splitlines()]
    per_rank: dict[int, list[str]] = {0: [], 1: []}
    pads = 0
    steps: Counter[int] = Counter()
    for record in records:
        per_rank[record["rank"]].extend(k for k in record["keys"] if not k.startswith("pad:"))
        pads += sum(k.startswith("pad:") for k in record["keys"])
        steps[record["rank"]] += 1
    assert steps[0] == steps[1]  # equal steps on both ranks
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == expected_sample_keys(uneven_shards)  # 27, each exactly once
    assert steps[0] * 2 * 2 == 27 + pads  # steps x batch x ranks = samples + padding
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Every 2nd step and the last, written once, by the main process only.
    assert [m["step"] for m in metrics] == sorted({*range(2, steps[0] + 1, 2), steps[0]})
    assert metrics[-1]["data_padded_samples"] == pads and metrics[-1]["data_bad_records"] == 0
    # DDP all-reduces exactly the trainable adapter gradients each step: no frozen weights, nothing twice
    # (a record covering 2 steps reports the per-step figure).
    assert all(m["allreduce_bytes"] == m["trainable_bytes"] > 0 for m in metrics)
