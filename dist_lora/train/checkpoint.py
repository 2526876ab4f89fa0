"""Crash-safe training checkpoints.

A checkpoint is a folder ``checkpoints/step-00000040`` holding the adapter parameters, the optimizer
(or DeepSpeed engine) state, the LR schedule, the data position and every rank's RNG state. It is
written into a temporary folder, flushed, renamed, and only then marked complete by ``COMPLETE``;
older checkpoints are pruned only after that. ``resume = "latest"`` ignores anything unmarked, so a
process killed mid-write leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dist_lora import parallel
from dist_lora.errors import DistLoraError
from dist_lora.utils.files import write_text_atomic
from dist_lora.utils.stop_signals import signal_hook

if TYPE_CHECKING:
    from dist_lora.train.ema import AdapterEMA

COMPLETE = "COMPLETE"
DATA_PROGRESS = "data_progress.json"  # every rank's loader position, in rank order
RUN_STATE = "run_state.json"  # first loss and earlier resumes, so the summary covers the whole run
_PREFIX = "step-"


@dataclass
class TrainPosition:
    step: int  # optimizer steps done
    micro_step: int  # micro-batches done
    epoch: int
    batch_in_epoch: int  # micro-batches of `epoch` already consumed


class CheckpointError(DistLoraError):
    """A checkpoint to resume from is missing or unusable."""


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """``""``: start fresh; ``"latest"``: newest complete checkpoint of this run (None if there is none);
    otherwise a checkpoint folder, which must be complete."""
    if not spec:
        return None
    if spec == "latest":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint.resume '{path}' is not a complete checkpoint folder (no {COMPLETE} "
                              f"marker); use 'latest' or a folder like {run_dir / 'checkpoints' / 'step-00000100'}.")
    return path


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep

    def save(self, accelerator: Any, model: Any, optimizer: Any, lr_scheduler: Any, trained: nn.Module,
             position: TrainPosition, ema: AdapterEMA | None = None, data_progress: dict[str, Any] | None = None,
             run_state: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. Returns the completed folder.

        ``data_progress`` is this rank's loader position (which samples it consumed this epoch), so a
        resume skips them without decoding them again."""
        final = self.root / f"{_PREFIX}{position.step:08d}"
        staging = self.root / f".tmp-{final.name}"
        is_main = accelerator.is_main_process
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        rng_states = parallel.gather_to_all(torch.get_rng_state())
        data_states = parallel.gather_to_all(data_progress)
        parallel.barrier(accelerator)
        parallel.save_engine_state(accelerator, model, optimizer, str(staging))
        params = [p for _, p in _adapter_params(trained)]
        with parallel.master_weights(accelerator, params):
            if is_main:
                save_file({n: p.detach().float().cpu().contiguous() for n, p in _adapter_params(trained)},
                          str(staging / "adapter_state.safetensors"))
        parallel.barrier(accelerator)
        signal_hook(f"checkpoint:{position.step}")
        if is_main:
            _crash_hook(position.step)
            torch.save(lr_scheduler.state_dict(), staging / "lr_scheduler.pt")
            save_file({f"rank{r}": s for r, s in enumerate(rng_states)}, str(staging / "rng.safetensors"))
            (staging / "position.json").write_text(json.dumps(asdict(position)))
            (staging / DATA_PROGRESS).write_text(json.dumps(data_states, ensure_ascii=False))
            (staging / RUN_STATE).write_text(json.dumps(run_state or {}))
            if ema is not None:
                ema.save(staging)
            _fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of an earlier crash
            staging.rename(final)
            write_text_atomic(final / COMPLETE, json.dumps({"step": position.step}))
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old)
        parallel.barrier(accelerator)
        return final

    @staticmethod
    def run_state(folder: Path) -> dict[str, Any]:
        """The run's history up to the checkpoint (first loss, earlier resumes); {} for older checkpoints."""
        path = folder / RUN_STATE
        return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}

    @staticmethod
    def all_data_progress(folder: Path) -> list[dict[str, Any] | None]:
        """Every rank's saved loader position, in rank order ([] for checkpoints without one)."""
        path = folder / DATA_PROGRESS
        return list(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else []

    @staticmethod
    def position(folder: Path) -> TrainPosition:
        return TrainPosition(**json.loads((folder / "position.json").read_text()))

    @staticmethod
    def load(folder: Path, accelerator: Any, model: Any, optimizer: Any, lr_scheduler: Any,
             trained: nn.Module) -> TrainPosition:
        state = load_file(str(folder / "adapter_state.safetensors"))
        named = dict(_adapter_params(trained))
        missing = sorted(set(named) - set(state))
        if missing:
            raise CheckpointError(f"checkpoint '{folder}' does not match this network: no state for {missing[:3]}.")
        params = list(named.values())
        with parallel.full_parameters(accelerator, params), torch.no_grad():
            for name, param in named.items():
                param.copy_(state[name].to(param.dtype))
        parallel.load_engine_state(accelerator, model, optimizer, str(folder))
        lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
        rng = load_file(str(folder / "rng.safetensors"))
        key = f"rank{accelerator.process_index}"
        if key in rng:
            torch.set_rng_state(rng[key])
        return CheckpointManager.position(folder)


def _adapter_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _crash_hook(step: int) -> None:
    """Test hook: ``DIST_LORA_KILL_DURING_CHECKPOINT=STEP`` SIGKILLs the main process half-way through
    writing that step's checkpoint, to prove a crash there loses nothing."""
    if os.environ.get("DIST_LORA_KILL_DURING_CHECKPOINT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
