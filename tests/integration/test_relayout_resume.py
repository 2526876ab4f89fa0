"""A requeued job on another number of processes continues the stopped epoch at its sample position."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import expected_sample_keys, tiny_train_config
from tests.integration.distributed_helpers import run_training

pytestmark = pytest.mark.slow

TWO_PROCESSES = "cpu_2proc.yaml"


def _raw(model: Path, shards: Path, out: Path, **checkpoint: object) -> dict:
    return tiny_train_config(model, shards, out, data={"num_workers": 2, "shuffle_buffer": 4},
                             training={"batch_size": 2, "max_steps": 0, "epochs": 2},
                             checkpoint={"every_steps": 2, **checkpoint}, logging={"record_sample_keys": True})


def _keys_per_epoch(run: Path) -> tuple[dict[int, Counter[str]], dict[int, set[int]]]:
    keys: dict[int, Counter[str]] = {}
    ranks: dict[int, set[int]] = {}
    for line in (run / "sample_keys.jsonl").read_text().splitlines():
        row = json.loads(line)
        keys.setdefault(row["epoch"], Counter()).update(k for k in row["keys"] if not k.startswith("pad:"))
        ranks.setdefault(row["micro_step"], set()).add(row["rank"])
    return keys, ranks


# 1 process resumed on 2: tests/unit/test_shard_plan.py, with real loaders and workers for each new rank.
@pytest.mark.parametrize(("before", "after"), [(TWO_PROCESSES, None)])
def test_resume_on_another_world_size_uses_every_sample_once(tiny_models: dict[str, Path], uneven_shards: Path,
                                                             tmp_path: Path, before: str | None,
                                                             after: str | None) -> None:
    """Stopped at step 2 of epoch 0 on one world size (2 ranks x 2 workers, or 1), resumed on the other:
    each epoch's samples, over both runs, are the dataset with its repeats, each exactly once."""
    run = tmp_path / "run"
    stopped = run_training(_raw(tiny_models["sdxl"], uneven_shards, run, stop_at_step=2), tmp_path, launch=before,
                           check=False)
    assert stopped.returncode != 0 and json.loads((run / "preempted.json").read_text())["step"] == 2
    # One data-position file per rank, no rank's state gathered to the others.
    parts = sorted((run / "checkpoints" / "step-00000002" / "ranks").glob("data_position-rank*.json"))
    saved = [json.loads(path.read_text()) for path in parts]
    assert len(saved) == (2 if before else 1) and all(state["epoch"] == 0 for state in saved)

    run_training(_raw(tiny_models["sdxl"], uneven_shards, run, resume="latest"), tmp_path, launch=after)
    keys, ranks = _keys_per_epoch(run)
    expected = expected_sample_keys(uneven_shards)
    assert keys[0] == expected and keys[1] == expected  # 27 samples with repeats, each once per epoch
    new_world = 2 if after else 1
    assert all(ranks[m] == set(range(new_world)) for m in ranks if m >= 2)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["step"] for r in summary["resumes"]] == [2]
    assert (run / "adapter.safetensors").is_file()
