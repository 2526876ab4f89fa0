"""Trainer overhead against the plainest correct loop, with the cost of each thing the trainer adds; and DDP
gradient traffic against the adapter size.

    .venv/bin/python benchmarks/step_overhead.py [--repeats 2] [--out benchmarks/results/step_overhead_cpu.json]

Setup (both sides): the tiny SDXL pipeline (`dist-lora tiny-model --arch sdxl`), the same 64 images (128 px,
square), batch 4, rank 8 LoRA on the attention projections (125.7k parameters), fp32, VAE and both text
encoders run every step. The reference is ``benchmarks/plain_loop.py``: a LoRA loop written the usual
diffusers way, importing nothing of dist_lora.

Time per step excludes start-up: the wall time of each of steps 11..70 of a run (from the end of one step to
the end of the next, so any wait for the loader is inside), pooled from ``--repeats`` runs per variant, and
its first quartile taken. Runs of all variants are interleaved. A shared 2-core machine slows by 15-40% for
spells of seconds to a minute; the best run of a few, or the median, still moved by 20% between identical
runs here, while the first quartile of pooled steps moves by a few percent.

Per-item costs: the trainer is run again with one of its additions switched off (patched out, here only),
and the item's cost is the step time it saves:
- keyed_draws: per-sample generators keyed by (seed, step, sample) -> batch-level torch.randn / randint;
- nonfinite_guard: the finiteness flag of the gradient norm and the apply-or-skip decision -> plain
  clip and step;
- loader: shard reading, decoding in a worker process and the hand-off -> the same batches, decoded
  before the run, from memory;
- metrics_output: metrics.jsonl, TensorBoard and the progress bar -> none;
- contexts: accelerate's accumulate / autocast contexts and backward wrapper -> none;
- cross_rank: the agreement calls (all-reduce of loss / flag / stop, counters, sample keys) -> local values.
Beside them, ``trainer_num_workers_0`` is the unpatched trainer with ``data.num_workers = 0`` (decoding in
the training process, as the plain loop does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelerate import Accelerator  # noqa: E402

from benchmarks.plain_loop import plain_sdxl_lora_loop  # noqa: E402
from dist_lora import parallel  # noqa: E402
from dist_lora.config import config_from_dict, to_toml  # noqa: E402
from dist_lora.data.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from dist_lora.data.shards import ShardLoader  # noqa: E402
from dist_lora.data.stream import pack_chunk  # noqa: E402
from dist_lora.data.synthetic import write_shapes_dataset  # noqa: E402
from dist_lora.models.tiny import write_tiny_pipeline  # noqa: E402
from dist_lora.train import conditioning, step  # noqa: E402
from dist_lora.train.loop import TrainingLoop  # noqa: E402
from dist_lora.train.tracking import MetricsLog  # noqa: E402
from dist_lora.train.trainer import train  # noqa: E402

BATCH, RANK, RESOLUTION, IMAGES = 4, 8, 128, 64
STEPS, SKIP = 70, 10  # steps per run; the first SKIP (warm-up, the loader's first fill) are not timed


def _raw(model: Path, shards: Path, out: Path, steps: int, **logging: object) -> dict[str, Any]:
    return {"model": {"pretrained": str(model)}, "data": {"shards": str(shards)},
            "network": {"rank": RANK, "alpha": float(RANK), "preset": "attn"},
            "training": {"batch_size": BATCH, "max_steps": steps, "mixed_precision": "no"},
            "output": {"dir": str(out), "overwrite": True}, "logging": dict(logging)}


@contextlib.contextmanager
def patched(*changes: tuple[Any, str, Any]) -> Iterator[None]:
    """Set attributes for the duration of the block."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _batch_normal(shape: tuple[int, ...], generators: list[Any]) -> torch.Tensor:
    return torch.randn((len(generators), *shape))


def _batch_noise(latents: torch.Tensor, generators: list[Any], options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn_like(latents, dtype=torch.float32)
    return noise, noise


def no_keyed_draws() -> contextlib.AbstractContextManager[None]:
    return patched(
        (step, "sample_generators", lambda seed, s, indices, device="cpu": [None] * len(indices)),
        (step, "draw_timesteps", lambda generators, options: torch.randint(0, 1000, (len(generators),))),
        (step, "draw_noise", _batch_noise),
        (conditioning, "per_sample_normal", _batch_normal))


def _clip_only(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float,
               device: torch.device) -> torch.Tensor:
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.zeros(())


def _step_only(accelerator: Accelerator, model: Any, optimizer: Any, **flags: bool) -> bool:
    optimizer.step()
    return True


def no_nonfinite_guard() -> contextlib.AbstractContextManager[None]:
    return patched((parallel, "nonfinite_gradient_flag", _clip_only), (parallel, "finish_step", _step_only))


class PredecodedLoader:
    """ShardLoader.stream replaced by the same samples decoded once, before the timed runs."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, tuple[int, ...]], list[dict[str, Any]]] = {}
        self.packed: dict[int, list[dict[str, Any]]] = {}
        self.original = ShardLoader.stream

    def stream(self, loader: ShardLoader, epoch: int, shard_indices: list[int], resume: Any = None) -> Any:
        key = (epoch, tuple(shard_indices))
        if key not in self.cache:
            self.cache[key] = list(self.original(loader, epoch, shard_indices, resume))
        return self.cache[key]

    def chunks(self, loader: ShardLoader, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The packed chunks a worker would send, made once from the pre-decoded samples."""
        key = id(samples)
        if key not in self.packed:
            size = loader.batch_size
            self.packed[key] = [pack_chunk(samples[i:i + size]) for i in range(0, len(samples), size)]
        return self.packed[key]

    def active(self) -> contextlib.AbstractContextManager[None]:
        def stream(loader: ShardLoader, epoch: int, shard_indices: list[int], resume: Any = None) -> Any:
            return self.stream(loader, epoch, shard_indices, resume)

        def worker_loader(loader: ShardLoader, samples: list[dict[str, Any]], workers: int) -> Any:
            return self.chunks(loader, samples)
        return patched((ShardLoader, "stream", stream), (ShardLoader, "_worker_loader", worker_loader))




def no_metrics_output() -> contextlib.AbstractContextManager[None]:
    return patched((MetricsLog, "log", lambda self, s, values: None))


@contextlib.contextmanager
def _nothing(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


def no_contexts() -> contextlib.AbstractContextManager[None]:
    return patched((Accelerator, "accumulate", _nothing), (Accelerator, "autocast", _nothing),
                   (Accelerator, "backward", lambda self, loss, **kw: loss.backward()))


def no_cross_rank() -> contextlib.AbstractContextManager[None]:
    return patched((parallel, "sum_tensor_across_ranks", lambda acc, tensor: tensor),
                   (parallel, "sum_across_ranks", lambda acc, values: values),
                   (parallel, "any_rank", lambda flag: flag),
                   (parallel, "gather_to_all", lambda value: [value]))


class StepClock:
    """Wall-clock time of each step after the first ``SKIP``: from one step's end to the next one's."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][SKIP - 1:]


class Variant:
    def __init__(self, name: str, run: Callable[[int, StepClock], None]) -> None:
        self.name, self.run = name, run
        self.steps: list[float] = []  # every timed step of every run
        self.run_means: list[float] = []  # per run: (T70 - T10) / 60, epoch starts and loader waits included

    def measure(self) -> None:
        clock = StepClock()
        self.run(STEPS, clock)
        self.steps += clock.durations()
        self.run_means.append(statistics.fmean(clock.durations()))

    def step_time(self) -> float:
        """The first quartile of all timed steps: a slow spell of the machine lengthens the steps it
        covers, which the lower quartile of steps pooled from interleaved runs leaves out, while a cost
        paid at most steps stays in."""
        return statistics.quantiles(self.steps, n=4)[0]


def _clocked(clock: StepClock) -> contextlib.AbstractContextManager[None]:
    original = TrainingLoop._end_of_step

    def end_of_step(loop: TrainingLoop, epoch: int, epoch_finished: bool = False) -> None:
        original(loop, epoch, epoch_finished)
        clock.tick()
    return patched((TrainingLoop, "_end_of_step", end_of_step))


def variants(model: Path, images: Path, shards: Path, tmp: Path) -> list[Variant]:
    def trainer(name: str, switched_off: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
                data: dict[str, Any] | None = None, **logging: object) -> Variant:
        def run(steps: int, clock: StepClock) -> None:
            raw = _raw(model, shards, tmp / name, steps, **logging)
            raw["data"].update(data or {})
            with switched_off(), _clocked(clock):
                train(config_from_dict(raw))
        return Variant(name, run)

    predecoded = PredecodedLoader()

    def plain(steps: int, clock: StepClock) -> None:
        plain_sdxl_lora_loop(model, images, steps=steps, batch_size=BATCH, resolution=RESOLUTION, rank=RANK,
                             on_step=clock.tick)

    quiet = {"progress_bar": False, "tensorboard": False}
    return [Variant("plain_loop", plain),
            trainer("trainer"),
            trainer("without_keyed_draws", no_keyed_draws),
            trainer("without_nonfinite_guard", no_nonfinite_guard),
            trainer("without_loader", predecoded.active),
            trainer("without_metrics_output", no_metrics_output, **quiet),
            trainer("without_contexts", no_contexts),
            trainer("without_cross_rank", no_cross_rank),
            trainer("trainer_num_workers_0", data={"num_workers": 0})]


def loader_cpu_per_batch(shards: Path, workers: int, epochs: int = 4) -> float:
    """CPU seconds the training process spends per batch taking the loader's batches (one epoch of warm-up
    first): with workers, the hand-off from them; with none, reading and decoding too. CPU time of this
    process alone, so the machine's slow spells and the workers' own time stay out."""
    loader = ShardLoader(shards, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=workers)
    try:
        for _ in loader.epoch(0):
            pass
        start, batches = time.process_time(), 0
        for epoch in range(1, epochs + 1):
            for _ in loader.epoch(epoch):
                batches += 1
                time.sleep(0.002)  # leave the workers time to refill, as a training step would
        return (time.process_time() - start) / batches
    finally:
        loader.close()


def ddp_traffic(model: Path, shards: Path, out: Path, tmp: Path) -> dict[str, float]:
    raw = _raw(model, shards, out, 8, comm_stats=True, progress_bar=False)
    raw["training"]["batch_size"] = 2
    recipe = tmp / "ddp.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "launch" / "cpu_2proc.yaml"), "-m", "dist_lora.train", "--config", str(recipe)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [x["allreduce_bytes"] for x in lines]
    trainable = lines[0]["trainable_bytes"]
    return {"allreduce_bytes_per_step_median": statistics.median(per_step), "trainable_bytes": trainable,
            "ratio": statistics.median(per_step) / trainable}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--label", default="", help="what this measurement is of (e.g. a commit or 'before')")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step_overhead_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_pipeline("sdxl", tmp / "model")
        # Square images at the training size: the plain loop's centre crop and the prepared shards agree.
        write_shapes_dataset(tmp / "src", images=IMAGES, repeats=1, size=RESOLUTION)
        prepare_dataset(tmp / "src", tmp / "shards", PrepareOptions(resolution=RESOLUTION, shard_size=16))
        runs = variants(model, tmp / "src", tmp / "shards", tmp)
        if args.only:
            runs = [run for run in runs if run.name in args.only.split(",")]
        for run in runs:  # warm-up: imports, file caches, the pre-decoded batches
            run.run(STEPS, StepClock())
        for _ in range(args.repeats):
            for run in runs:
                run.measure()
                print(f"{run.name}: {run.step_time() * 1e3:.1f} ms/step so far", flush=True)
        traffic = ddp_traffic(model, tmp / "shards", tmp / "ddp", tmp)
        loader_cpu = {"worker_1": loader_cpu_per_batch(tmp / "shards", 1),
                      "inline_num_workers_0": loader_cpu_per_batch(tmp / "shards", 0)}
    best = {run.name: run.step_time() for run in runs}
    plain, ours = best.get("plain_loop", float("nan")), best.get("trainer", float("nan"))
    means = {run.name: min(run.run_means) for run in runs}
    mean_plain, mean_ours = means.get("plain_loop", float("nan")), means.get("trainer", float("nan"))
    result = {
        "benchmark": "step_overhead",
        "label": args.label,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "accelerate", "peft",
                                                           "transformers", "deepspeed")},
        "setup": {"model": "tiny SDXL (dist-lora tiny-model)", "images": IMAGES, "resolution": RESOLUTION,
                  "batch_size": BATCH, "lora": f"rank {RANK} attention", "precision": "fp32",
                  "method": f"first quartile of the wall times of steps {SKIP + 1}..{STEPS} pooled from {args.repeats} "
                            f"runs per variant, variants interleaved"},
        "plain_loop_step_s": plain,
        "trainer_step_s": ours,
        "overhead_fraction": ours / plain - 1.0,
        "item_cost_s": {run.name.removeprefix("without_"): ours - best[run.name] for run in runs
                        if run.name.startswith("without_")},
        "median_step_s": {run.name: statistics.median(run.steps) for run in runs},
        # The mean step of a run over steps 11..70 (4 epoch starts with their loader refills included), the
        # best run of each variant: a statistic that a cost paid at a few steps cannot hide from.
        "best_run_mean_step_s": means,
        "overhead_fraction_best_run_mean": mean_ours / mean_plain - 1.0,
        "ddp_2proc": traffic,
        # The training process's CPU time per batch of 4 for taking the loader's batches.
        "loader_main_process_cpu_s_per_batch": loader_cpu,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
