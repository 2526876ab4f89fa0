"""DDP and DeepSpeed ZeRO-2/3 on two real CPU processes compute what one process computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import (
    REPO,
    free_port,
    identical_samples_shards,
    run_training,
    zero3_everything_partitioned,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def same_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return identical_samples_shards(tmp_path_factory.mktemp("same"))


def _raw(model: Path, shards: Path, out: Path, **training: object) -> dict:
    return tiny_train_config(model, shards, out, optimizer={"lr": 1e-3, "max_grad_norm": 0.0},
                             training={"max_steps": 3, "batch_size": 4, **training})


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path], same_shards: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, torch.Tensor]:
    """1 process x batch 4."""
    tmp = tmp_path_factory.mktemp("reference")
    run_training(_raw(tiny_models["sd15"], same_shards, tmp / "run"), tmp)
    return load_file(str(tmp / "run" / "adapter.safetensors"))


def _assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    assert got.keys() == want.keys()
    # lora_up starts at zero: its size is how far training moved the adapter.
    moved = max(want[k].abs().max().item() for k in want if "lora_up" in k)
    assert moved > 1e-4, "the adapter did not move; the comparison would be vacuous"
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-4, msg=key)


def test_gradient_accumulation_equals_larger_batch(tiny_models: dict[str, Path], same_shards: Path,
                                                   reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    run_training(_raw(tiny_models["sd15"], same_shards, tmp_path / "run", batch_size=2,
                      gradient_accumulation_steps=2), tmp_path)
    _assert_same_adapter(load_file(str(tmp_path / "run" / "adapter.safetensors")), reference)


@pytest.mark.parametrize("launch", ["cpu_2proc.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_equal_one(launch: str, tiny_models: dict[str, Path], same_shards: Path,
                                 reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    run_training(_raw(tiny_models["sd15"], same_shards, tmp_path / "run", batch_size=2), tmp_path, launch=launch)
    got = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    # Complete and unprefixed even under ZeRO-3, where every rank holds only a shard of each tensor.
    assert not any(k.startswith("module.") or ".module." in k for k in got)
    assert all(t.numel() > 0 for t in got.values())
    _assert_same_adapter(got, reference)


def test_fp8_base_under_zero2_on_two_processes_equals_one(tiny_models: dict[str, Path], same_shards: Path,
                                                         tmp_path: Path) -> None:
    """model.base_dtype = 'fp8' under DeepSpeed ZeRO-2: the engine's set-up leaves the one-byte weights as they
    are, and two processes train the adapter one process trains on the same fp8 base."""
    def fp8(out: Path, batch_size: int) -> dict:
        raw = _raw(tiny_models["sd15"], same_shards, out, batch_size=batch_size)
        raw["model"]["base_dtype"] = "fp8"
        return raw

    run_training(fp8(tmp_path / "one", 4), tmp_path)
    run_training(fp8(tmp_path / "two", 2), tmp_path, launch="zero2.yaml")
    one, two = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("one", "two"))
    # Each layer's fp8 weights are upcast and multiplied in another order on 2 x 2 samples than on 4: up to
    # 3.1e-6 apart after 3 steps (measured here), against an adapter that moved up to 3e-3.
    _assert_same_adapter(two, one, atol=5e-6)


def test_srun_style_launch_equals_one_process(tiny_models: dict[str, Path], same_shards: Path,
                                              reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """What slurm/train.sbatch does: each task runs `python -m dist_lora.train` itself with RANK,
    WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from Slurm; no launcher in between."""
    from dist_lora.config import config_from_dict, to_toml

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(config_from_dict(_raw(tiny_models["sd15"], same_shards, tmp_path / "run",
                                                    batch_size=2))))
    base_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "dist_lora.train", "--config", str(recipe)], cwd=REPO,
                              env={**base_env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
    _assert_same_adapter(load_file(str(tmp_path / "run" / "adapter.safetensors")), reference)


@pytest.mark.parametrize("launch", ["zero2_offload.yaml", "zero3_offload.yaml"])
def test_offload_configs_train(launch: str, tiny_models: dict[str, Path], same_shards: Path,
                               reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Optimizer (and ZeRO-3 parameter) offload: DeepSpeed's CPU Adam computes what torch's AdamW does."""
    run_training(_raw(tiny_models["sd15"], same_shards, tmp_path / "run", batch_size=2), tmp_path, launch=launch)
    got = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert got.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=1e-3, msg=key)


def test_zero3_with_gradient_checkpointing_equals_one_process(tiny_models: dict[str, Path], same_shards: Path,
                                                              reference: dict[str, torch.Tensor],
                                                              tmp_path: Path) -> None:
    """Non-reentrant checkpointing under ZeRO-3 (parameters gathered again in the recomputation)."""
    run_training(_raw(tiny_models["sd15"], same_shards, tmp_path / "run", batch_size=2,
                      gradient_checkpointing=True), tmp_path, launch="zero3.yaml")
    _assert_same_adapter(load_file(str(tmp_path / "run" / "adapter.safetensors")), reference)


def _skipped_steps(run: Path) -> list[int]:
    import json

    return [json.loads(line)["skipped_steps"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_step_skipped_inside_accumulation_leaves_nothing_behind_under_zero2(
        tiny_models: dict[str, Path], same_shards: Path, tmp_path: Path) -> None:
    """A NaN on rank 1 in step 2 (of 2 micro-steps each): DeepSpeed skips the update and clears its
    gradient buffers, so step 3 equals DDP's step 3 after the same skip."""
    results = {}
    for launch in ("cpu_2proc.yaml", "zero2.yaml"):
        run = tmp_path / launch
        run_training(_raw(tiny_models["sd15"], same_shards, run, batch_size=1, gradient_accumulation_steps=2),
                     tmp_path, launch=launch, env={"DIST_LORA_INJECT_NAN": "1:2"})
        assert _skipped_steps(run) == [0, 1, 1]
        results[launch] = load_file(str(run / "adapter.safetensors"))
    _assert_same_adapter(results["zero2.yaml"], results["cpu_2proc.yaml"])


def test_bf16_zero2_equals_bf16_ddp(tiny_models: dict[str, Path], same_shards: Path, tmp_path: Path) -> None:
    """Adapters keep fp32 master weights under DeepSpeed bf16 as under DDP autocast; the two agree to
    bf16 rounding (DeepSpeed computes the adapters' forward and gradients in bf16, autocast only the
    matmuls). Adam normalises each element's step, so elements whose gradient is near zero can differ by
    up to a step: the tolerance is on each tensor's relative norm (measured: at most 1.3%)."""
    results = {}
    for launch in ("cpu_2proc.yaml", "zero2.yaml"):
        run = tmp_path / launch
        run_training(_raw(tiny_models["sd15"], same_shards, run, batch_size=2, mixed_precision="bf16"),
                     tmp_path, launch=launch)
        results[launch] = load_file(str(run / "adapter.safetensors"))
    ddp, zero = results["cpu_2proc.yaml"], results["zero2.yaml"]
    # Exported from DeepSpeed's fp32 master weights, not its bf16 module copy.
    assert any(not torch.equal(t, t.bfloat16().float()) for t in zero.values())
    moved = max(ddp[k].abs().max().item() for k in ddp if "lora_up" in k)
    assert moved > 1e-4
    errors = {k: ((zero[k] - ddp[k]).norm() / ddp[k].norm()).item() for k in ddp if ddp[k].norm() > 0}
    print("bf16 ZeRO-2 vs DDP, largest relative errors:", sorted(errors.values())[-3:])
    assert max(errors.values()) <= 0.05, max(errors.items(), key=lambda kv: kv[1])


def _averaged_and_scaled(model: Path, shards: Path, out: Path, batch_size: int) -> dict:
    made = _raw(model, shards, out, batch_size=batch_size, scale_weight_norms=2e-4)
    made["ema"] = {"decay": 0.9, "export": True}
    return made


@pytest.fixture(scope="module")
def averaged_and_scaled_reference(tiny_models: dict[str, Path], same_shards: Path,
                                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process x batch 4, weight average exported, update norms capped."""
    from dist_lora.config import config_from_dict
    from dist_lora.train.trainer import train

    run = tmp_path_factory.mktemp("averaged") / "run"
    train(config_from_dict(_averaged_and_scaled(tiny_models["sd15"], same_shards, run, 4)))
    return run


@pytest.mark.parametrize("launch", ["cpu_2proc.yaml", "zero2.yaml", "zero3.yaml", "zero3 partitioned"])
def test_weight_average_and_max_norm_on_two_processes_equal_one(launch: str, tiny_models: dict[str, Path],
                                                                 same_shards: Path,
                                                                 averaged_and_scaled_reference: Path,
                                                                 tmp_path: Path) -> None:
    """Both act after each step: under DDP on every rank's replica, which must stay identical; under
    DeepSpeed on the optimizer's (partitioned) fp32 master weights and the module's copy, which must both
    take the scaled values. The exported file is the average, of weights shrunk to the norm limit."""
    import json

    if launch == "zero3 partitioned":
        launch = str(zero3_everything_partitioned(tmp_path))
    run_training(_averaged_and_scaled(tiny_models["sd15"], same_shards, tmp_path / "two", 2), tmp_path,
                 launch=launch)
    _assert_same_adapter(load_file(str(tmp_path / "two" / "adapter.safetensors")),
                         load_file(str(averaged_and_scaled_reference / "adapter.safetensors")))
    for run in (averaged_and_scaled_reference, tmp_path / "two"):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["keys_scaled"] > 0, records[-1]


@pytest.mark.parametrize(("kind", "launch"), [("oft", "zero3 partitioned"), ("boft", "cpu_2proc.yaml")])
def test_orthogonal_adapters_on_two_processes_equal_one(kind: str, launch: str, tiny_models: dict[str, Path],
                                                        same_shards: Path, tmp_path: Path) -> None:
    """OFT/BOFT rotate the base layer's output (its bias taken out): under ZeRO-3 with no parameter kept whole,
    the bias is a partitioned parameter too. Plain SGD: Adam's normalised step turns the summation-order noise
    of near-zero gradients (1e-9) into differences of 4e-6 on 2 x 2 samples against 4."""
    def run(out: Path, batch_size: int) -> dict[str, torch.Tensor]:
        raw = _raw(tiny_models["sd15"], same_shards, out, batch_size=batch_size)
        raw["network"].update(type=kind, rank=8 if kind == "boft" else 4, preset="full", oft_constraint=0.05)
        raw["optimizer"].update(type="torch.optim.SGD", lr=2.0)
        run_training(raw, tmp_path, launch=None if batch_size == 4 else launch)
        return load_file(str(out / "adapter.safetensors"))

    if launch == "zero3 partitioned":
        launch = str(zero3_everything_partitioned(tmp_path))
    one, two = run(tmp_path / "one", 4), run(tmp_path / "two", 2)
    assert one.keys() == two.keys() and any(k.endswith(".oft_blocks") for k in one)
    # The blocks start at zero: their size is how far training moved them.
    moved = max(t.abs().max().item() for k, t in one.items() if k.endswith(".oft_blocks"))
    print(f"{kind}: blocks moved up to {moved:.3g}, differ by up to "
          f"{max((two[k] - one[k]).abs().max().item() for k in one):.3g}")
    assert moved > 1e-3
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4 * moved, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")
