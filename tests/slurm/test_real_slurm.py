"""slurm/train.sbatch on a real two-node Slurm cluster (scripts/slurm_cluster.sh; .ci/run starts one).

Every job is submitted with slurm/submit.sh from a directory outside the repository, runs 2 nodes x 1
task with 2 loader workers per task, and is compared with an uninterrupted run tensor for tensor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_lora.config import config_from_dict, to_toml
from tests.conftest import tiny_train_config
from tests.integration.distributed_helpers import REPO

# Under pytest-xdist (scripts/test.sh runs 2 workers, --dist loadgroup) these tests run on one worker, one
# after another: two jobs at once would wait for each other's nodes, and the preemption test's urgent job
# must have only its own victim to preempt.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm_cluster"),
              pytest.mark.skipif(not os.environ.get("DIST_LORA_SLURM_CLUSTER"),
                                 reason="no Slurm cluster: run `bash scripts/slurm_cluster.sh start DIR` and source "
                                        "DIR/env")]
STEPS = 10


def _recipe(tmp: Path, model: Path, shards: Path, run: Path, steps: int = STEPS, **sections: dict) -> Path:
    raw = tiny_train_config(model, shards, run, data={"num_workers": 2},
                            training={"batch_size": 2, "max_steps": steps}, **sections)
    path = tmp / f"{run.name}.toml"
    path.write_text(to_toml(config_from_dict(raw)))
    return path


def _submit(recipe: Path, cwd: Path, *options: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["bash", str(REPO / "slurm" / "submit.sh"), "--parsable", "--nodes=2",
                           "--ntasks-per-node=1", f"--output={cwd}/job-%j.out", *options, str(recipe)],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job: str, predicate, timeout: float = 240, what: str = "") -> dict[str, str]:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        info = _job(job)
        if predicate(info):
            return info
        assert time.time() < deadline, f"job {job}: timed out waiting for {what}: {info.get('JobState')}"
        time.sleep(0.5)


def _finish(job: str, restarts: int) -> dict[str, str]:
    """Wait for the requeue (the test cluster holds a requeued job 10 s, real clusters about 2 minutes)
    and for the end of the run that follows."""
    _wait(job, lambda i: int(i.get("Restarts", 0)) >= restarts, what="the requeue")
    return _wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), timeout=360,
                 what="the end")


def _handling_tasks(recipe: Path) -> bool:
    """Both training processes have their stop-signal handlers in place (they are loading models)."""
    pids = subprocess.run(["pgrep", "-f", f"dist_lora.train --config {recipe}"], capture_output=True,
                          text=True).stdout.split()
    caught = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        caught += bool(mask >> (15 - 1) & 1)  # SIGTERM
    return caught >= 2


def _started_training(run: Path, lines: int = 2) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("\n") >= lines


def _log(cwd: Path, job: str) -> str:
    return (cwd / f"job-{job}.out").read_text()


@pytest.fixture(scope="module")
def straight(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, object]:
    """2 nodes, no interruption: the reference, and the check that multi-node training works."""
    cwd = tmp_path_factory.mktemp("straight")
    recipe = _recipe(cwd, tiny_models["sd15"], shapes_shards, cwd / "run")
    job = _submit(recipe, cwd)
    info = _wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED"), what="the end")
    assert info["JobState"] == "COMPLETED", _log(cwd, job)[-3000:]
    assert "2 node(s) x 1 task(s)" in _log(cwd, job)
    return {"adapter": load_file(str(cwd / "run" / "adapter.safetensors")),
            "losses": [json.loads(x)["loss"] for x in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]}


def _assert_same_run(run: Path, straight: dict[str, object]) -> None:
    adapter = load_file(str(run / "adapter.safetensors"))
    reference = straight["adapter"]
    assert isinstance(reference, dict)
    assert all(adapter[k].equal(reference[k]) for k in reference)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once, despite the replay
    assert [r["loss"] for r in records] == straight["losses"]


@pytest.mark.parametrize("how", ["usr1_to_batch_shell", "sigterm_to_step"])
def test_signal_checkpoints_requeues_and_resumes_exactly(how: str, straight: dict[str, object],
                                                         tiny_models: dict[str, Path], shapes_shards: Path,
                                                         tmp_path: Path) -> None:
    """The USR1 variant also runs the other launcher: DIST_LORA_LAUNCHER=accelerate, one task per node
    running `accelerate launch --num_machines 2 --machine_rank $SLURM_NODEID` with the default launch
    config; its tensors must equal the srun-launched reference run's."""
    run = tmp_path / "run"
    env = {"DIST_LORA_LAUNCHER": "accelerate"} if how == "usr1_to_batch_shell" else {}
    job = _submit(_recipe(tmp_path, tiny_models["sd15"], shapes_shards, run), tmp_path, env=env)
    _wait(job, lambda i: _started_training(run), what="training")
    # USR1 to the batch shell only is what `#SBATCH --signal=B:USR1@T` sends before the time limit;
    # `scancel --signal=TERM` signals every process of the step, loader workers included.
    signal_args = ["--batch", "--signal=USR1"] if how == "usr1_to_batch_shell" else ["--signal=TERM"]
    subprocess.run(["scancel", *signal_args, job], check=True)
    info = _finish(job, restarts=1)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "requeueing" in log and "DataLoader worker" not in log
    _assert_same_run(run, straight)
    assert len(json.loads((run / "summary.json").read_text())["resumes"]) == 1


def test_preemption_by_a_higher_priority_partition(tiny_models: dict[str, Path], shapes_shards: Path,
                                                   tmp_path: Path) -> None:
    """Long enough (200 steps) that the preemption always lands while it trains; exactness after a
    SIGTERM-requeue-resume is checked above."""
    run = tmp_path / "run"
    job = _submit(_recipe(tmp_path, tiny_models["sd15"], shapes_shards, run, steps=200), tmp_path)
    _wait(job, lambda i: _started_training(run), what="training")
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=high", "--nodes=2", "--ntasks-per-node=2",
                             f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 2"],
                            capture_output=True, text=True, check=True).stdout.strip()
    _wait(urgent, lambda i: i.get("JobState") == "COMPLETED", what="the preempting job")
    info = _finish(job, restarts=1)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 201))
    resumes = json.loads((run / "summary.json").read_text())["resumes"]
    assert len(resumes) == 1 and 0 < resumes[0]["step"] < 200


def test_signal_during_start_up_requeues_before_the_first_step(straight: dict[str, object],
                                                               tiny_models: dict[str, Path], shapes_shards: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_models["sd15"], shapes_shards, run)
    job = _submit(recipe, tmp_path)
    _wait(job, lambda i: _handling_tasks(recipe), timeout=120, what="the tasks' start")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    info = _finish(job, restarts=1)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "stopped at step 0" in log and not (run / "checkpoints" / "step-00000000").exists()
    _assert_same_run(run, straight)


def test_signal_while_caching_requeues_and_resumes_the_cache(tiny_models: dict[str, Path], shapes_shards: Path,
                                                             tmp_path: Path) -> None:
    cached, run = tmp_path / "cached", tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_models["sd15"], cached, run)
    env = {"DIST_LORA_CACHE_SRC": str(shapes_shards), "DIST_LORA_CACHE_OUT": str(cached),
           "DIST_LORA_CACHE_MODEL": str(tiny_models["sd15"]), "DIST_LORA_SIGNAL_AT": "cache_shard:1"}
    job = _submit(recipe, tmp_path, env=env)
    # The first start is signalled after each task's first shard; the requeued start (same environment)
    # has no second shard left to trigger it, so it finishes the cache and trains.
    info = _finish(job, restarts=1)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "caching stopped (SIGTERM) after 1 shard" in log and "(1 already done)" in log
    assert (cached / "manifest.json").is_file() and (run / "adapter.safetensors").is_file()


def test_plain_sbatch_outside_the_repository_fails_clearly(tiny_models: dict[str, Path], shapes_shards: Path,
                                                           tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_models["sd15"], shapes_shards, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_LORA_") or k == "DIST_LORA_SLURM_CLUSTER"}
    command = ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "train.sbatch"),
               str(recipe)]
    job = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    info = _wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED"), what="the end")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "is not the dist_lora repository" in _log(tmp_path, job) and "slurm/submit.sh" in _log(tmp_path, job)


def test_a_rank_that_dies_ends_the_step_at_once(tiny_models: dict[str, Path], shapes_shards: Path,
                                                tmp_path: Path) -> None:
    """Rank 1 runs out of memory at step 3; rank 0 is then waiting in that step's all-reduce. The step
    ends at once (srun --kill-on-bad-exit) instead of after the collective's time-out (30 minutes)."""
    run = tmp_path / "run"
    job = _submit(_recipe(tmp_path, tiny_models["sd15"], shapes_shards, run), tmp_path,
                  env={"DIST_LORA_INJECT_OOM": "1:3"})
    _wait(job, lambda i: _started_training(run, lines=2), what="training")
    started = time.time()
    info = _wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED"), timeout=120, what="the end")
    log = _log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-3000:]
    assert time.time() - started < 60
    assert "ran out of memory" in log and "requeueing" not in log
    assert not (run / "adapter.safetensors").exists()


def test_prepare_over_srun_tasks_equals_one_process(tmp_path: Path) -> None:
    """`srun ... dist-lora prepare` on 2 nodes with Slurm's task variables only; the batch shell's own
    prepare (not a step task) runs as one process beside it."""
    from PIL import Image

    src = tmp_path / "src" / "2_thing"
    src.mkdir(parents=True)
    for i in range(9):
        Image.new("RGB", (96 + 16 * (i % 4), 128), (25 * i, 100, 200 - 20 * i)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"thing {i}")
    python = REPO / ".venv" / "bin" / "python"
    prepare = f"{python} -m dist_lora.cli prepare {tmp_path / 'src'}"
    options = "--resolution 128 --shard-size 2 --workers 1"
    script = f"set -e; cd {REPO}; {prepare} {tmp_path / 'one'} {options}; srun {prepare} {tmp_path / 'two'} {options}"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/p-%j.out",
                          "--wrap", script], capture_output=True, text=True, check=True).stdout.strip()
    info = _wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), timeout=240,
                 what="the prepare job")
    log = (tmp_path / f"p-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert "processes" not in one and two["processes"] == [5, 4]
    assert (two["accepted"], two["samples_with_repeats"], two["buckets"]) == \
           (one["accepted"], one["samples_with_repeats"], one["buckets"]) == (9, 18, one["buckets"])
