"""Metrics: a JSONL file in the run directory, the console/progress bar, TensorBoard and optionally wandb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dist_lora.utils.files import write_text_atomic

VALIDATION_LOG = "validation.jsonl"


def read_validation_log(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation a run logged, in order; [] without a log."""
    path = run_dir / VALIDATION_LOG
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(int(r["step"]), float(r["val_loss"])) for r in records]


class MetricsLog:
    """Only the main process holds a real one; other ranks get ``enabled=False`` and write nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, progress_bar: bool,
                 wandb_project: str = "", run_config: dict[str, Any] | None = None, tensorboard: bool = False) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        self._tensorboard = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True) if enabled and progress_bar else None
        self._wandb = None
        if enabled and wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a run resumed from an older checkpoint replays them, and a
        fresh start (step 0) in a reused run directory drops another run's records."""
        if self._file is None:
            return
        path = Path(self._file.name)
        self._file.close()
        for log in (path, self.run_dir / VALIDATION_LOG):
            if log.is_file():
                kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                write_text_atomic(log, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                  lr=f"{metrics.get('lr', 0.0):.2e}",
                                  it_s=f"{metrics.get('steps_per_s', 0.0):.2f}")
        else:  # logs and batch jobs: one plain line per logged step
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"train/{name}", value, step)
            self._tensorboard.flush()

    def log_validation(self, step: int, loss: float) -> None:
        """A validation loss, to validation.jsonl and the trackers."""
        if not self.enabled:
            return
        with open(self.run_dir / VALIDATION_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "val_loss": loss}) + "\n")
        if self._bar is None:
            print(f"step={step} val_loss={loss:.4g}", flush=True)
        if self._wandb is not None:
            self._wandb.log({"val_loss": loss}, step=step)
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("val/loss", loss, step)
            self._tensorboard.flush()

    def log_images(self, step: int, images: list[tuple[str, Any]]) -> None:
        """Sample images (label, PIL image) of a round, to the trackers."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            import numpy as np

            for label, image in images:
                self._tensorboard.add_image(f"samples/{label}", np.asarray(image.convert("RGB")), step,
                                            dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"samples": [wandb.Image(image, caption=label) for label, image in images]}, step=step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


class SampleKeyLog:
    """sample_keys.jsonl: which rank consumed which samples at which micro-step (main process writes)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self._file = open(run_dir / "sample_keys.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115

    def truncate_from(self, micro_step: int) -> None:
        """Drop records of micro-steps from ``micro_step`` on: a resume from an older checkpoint replays them."""
        if self._file is None:
            return
        path = Path(self._file.name)
        self._file.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["micro_step"] < micro_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, epoch: int, micro_step: int, per_rank_keys: list[list[str]]) -> None:
        if self._file is None:
            return
        for rank, keys in enumerate(per_rank_keys):
            self._file.write(json.dumps({"epoch": epoch, "micro_step": micro_step, "rank": rank, "keys": keys},
                                        ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
