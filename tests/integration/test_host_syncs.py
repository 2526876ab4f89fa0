"""The loop's host-synchronisation budget, counted on real processes: per optimizer step at most one
host-device synchronisation (a read back to the host, a blocking copy to the device, an explicit wait,
bitsandbytes' per-parameter sync included) and one small collective (DDP's gradient all-reduce aside)."""

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import run_training

COUNTER = Path(__file__).with_name("count_host_syncs.py")


@pytest.mark.slow
def test_one_read_and_one_collective_per_optimizer_step(tiny_models: dict[str, Path], shapes_shards: Path,
                                                        tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / "run",
                            data={"num_workers": 1}, optimizer={"type": "adamw8bit"},
                            training={"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5},
                            logging={"log_every": 100})
    run_training(raw, tmp_path, launch="cpu_2proc.yaml", script=COUNTER,
                 env={"COUNT_SYNCS_OUT": str(tmp_path / "counts")})
    for rank in (0, 1):
        steps = json.loads((tmp_path / "counts" / f"rank{rank}.json").read_text())
        assert len(steps) == 5
        # Window 0 holds start-up; windows 1..4 each hold one full step (2 micro-steps, the previous
        # step's end) and no logging, which happens only at the last step.
        for window in steps[1:]:
            assert window["reads"] == 1, json.dumps(window["origins"])
            assert window["collectives"] == 1, window["origins"]
