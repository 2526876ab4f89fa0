"""The one module that knows how processes are distributed: accelerate with DDP or DeepSpeed ZeRO.

Everything else asks it for the rank, the world size, a wrapped model, gathered adapter weights or a
cross-rank reduction.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, gather_object
from torch import nn

from dist_lora.errors import DistLoraError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    is_main: bool
    device: torch.device


@dataclass(frozen=True)
class TrainingShape:
    mixed_precision: str
    gradient_accumulation_steps: int
    micro_batch_size: int
    max_grad_norm: float
    bitsandbytes_optimizer: bool
    gradient_checkpointing: bool = False


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


_OFFLOAD_VARS = ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


def _deepspeed_config_file() -> dict[str, Any]:
    """The DeepSpeed JSON an accelerate config names with deepspeed_config_file ({} without one): its
    settings then reach the processes through that file instead of accelerate's variables."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path in ("", "None"):
        return {}
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistLoraError(f"deepspeed_config_file '{path}' (from the accelerate config) cannot be read as "
                            f"JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise DistLoraError(f"deepspeed_config_file '{path}' (from the accelerate config) holds a "
                            f"{type(loaded).__name__}; DeepSpeed needs a JSON object.")
    return loaded


def _zero_section() -> dict[str, Any]:
    section = _deepspeed_config_file().get("zero_optimization", {})
    return section if isinstance(section, dict) else {}


def _offload_requested() -> bool:
    if any(os.environ.get(var, "none").lower() not in ("none", "") for var in _OFFLOAD_VARS):
        return True
    zero = _zero_section()
    return any(isinstance(zero.get(key), dict) and str(zero[key].get("device", "none")).lower() != "none"
               for key in ("offload_optimizer", "offload_param"))


def check_launch(shape: TrainingShape) -> None:
    """Refuse combinations that accelerate or DeepSpeed would silently change."""
    if shape.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DistLoraError("training.mixed_precision = 'fp16' needs a CUDA GPU (fp16 autocast with loss scaling); "
                            "use 'bf16' or 'no' on CPU.")
    if requested_zero_stage() == 3 and shape.gradient_checkpointing:
        check_zero3_checkpointing(_installed_deepspeed())
    if deepspeed_requested() and _offload_requested() and shape.bitsandbytes_optimizer:
        raise DistLoraError("a bitsandbytes optimizer cannot run with DeepSpeed optimizer offload (accelerate would "
                            "silently replace it by DeepSpeedCPUAdam); use optimizer.type = 'adamw' or a launch "
                            "config without offload.")


def launched_rank() -> int:
    """This process's rank as the launcher set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """Processes the launcher started (torchrun, accelerate, srun via RANK/WORLD_SIZE), before any
    process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def adopt_slurm_tasks() -> None:
    """Under ``srun`` with several tasks and no launcher's variables (``srun -n 8 dist-lora prepare ...``):
    take RANK / WORLD_SIZE / LOCAL_RANK from Slurm's task variables and the rendezvous from the step's first
    node, as slurm/train.sbatch exports them for training. Nothing changes where RANK is already set or
    the step has one task (a batch script's own shell is not a step task: it has no SLURM_STEP_NUM_TASKS)."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in env or tasks <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(tasks)
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_node(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if "MASTER_PORT" not in env:  # the same on every task of the step, and another per step of a job
        env["MASTER_PORT"] = str(20000 + (int(env.get("SLURM_JOB_ID", "0")) + int(env.get("SLURM_STEP_ID", "0"))
                                          + 1) % 10000)


def _first_node(nodelist: str) -> str:
    import subprocess

    if nodelist and not any(c in nodelist for c in "[,"):
        return nodelist
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DistLoraError(f"cannot find the first node of the Slurm step ('{nodelist}') for the rendezvous "
                            f"({exc}); export MASTER_ADDR=<that node's address> before srun.") from exc
    if not names:
        raise DistLoraError(f"'scontrol show hostnames {nodelist}' printed no node; export MASTER_ADDR before srun.")
    return names[0]


def requested_zero_stage() -> int:
    """The ZeRO stage the launch asks for (0 without DeepSpeed), before the accelerator exists."""
    if not deepspeed_requested():
        return 0
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ:
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    if _deepspeed_config_file():
        return int(_zero_section().get("stage", 0))  # DeepSpeed's own default: no ZeRO
    return 2  # accelerate's default


# ZeRO-3 partitioned frozen parameters again during a non-reentrant checkpoint's recompute, which then
# failed its shape check, until DeepSpeed 0.19.4 (deepspeedai/DeepSpeed#8148).
ZERO3_CHECKPOINTING_MIN_DEEPSPEED = "0.19.4"


def _installed_deepspeed() -> str:
    from importlib.metadata import version

    return version("deepspeed")


def check_zero3_checkpointing(deepspeed_version: str) -> None:
    from packaging.version import Version

    if Version(deepspeed_version) < Version(ZERO3_CHECKPOINTING_MIN_DEEPSPEED):
        raise DistLoraError(
            f"ZeRO-3 with training.gradient_checkpointing = true needs deepspeed >= "
            f"{ZERO3_CHECKPOINTING_MIN_DEEPSPEED} (installed: {deepspeed_version}); older releases fail in the "
            f"backward pass on frozen weights. Upgrade deepspeed, use launch/zero2.yaml, or turn checkpointing off.")


def process_world() -> World:
    """Rank and world of a job that trains nothing (`dist-lora cache`), from the launcher's environment.

    On CPU accelerate's multi-CPU state brings up a gloo process group; on GPUs, NCCL."""
    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    state = PartialState(cpu=not torch.cuda.is_available())
    return World(state.process_index, state.num_processes, state.local_process_index, state.is_main_process,
                 state.device)


def shutdown() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter teardown, gloo's
    threads can be destroyed while joinable, and the C++ runtime aborts the process (SIGABRT) after a
    clean stop."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a collective: call on all ranks). Works with or
    without an accelerator (caching has none), on the process group accelerate set up."""
    state = PartialState()
    if state.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=state.device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def wait_for_everyone() -> None:
    PartialState().wait_for_everyone()


def make_accelerator(shape: TrainingShape) -> Accelerator:
    check_launch(shape)
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        # A previous in-process run (tests, notebooks) leaves accelerate's singleton state behind;
        # it would refuse a different precision. Nothing is shared yet, so start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    if deepspeed_requested():
        if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Without CUDA accelerate would count one process and DeepSpeed would then fail its
            # batch-size check; a gloo process group first makes both see the real world size.
            PartialState(backend="gloo")
        accelerator = Accelerator(mixed_precision=shape.mixed_precision,
                                  gradient_accumulation_steps=shape.gradient_accumulation_steps)
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # No DataLoader goes through prepare() (the shard loader splits data itself), so DeepSpeed
        # cannot infer these; they must agree with the trainer's own numbers.
        ds_config["train_micro_batch_size_per_gpu"] = shape.micro_batch_size
        ds_config["gradient_accumulation_steps"] = shape.gradient_accumulation_steps
        ds_config["gradient_clipping"] = shape.max_grad_norm
        if shape.mixed_precision == "bf16":
            # Skip (and clear) a step whose gradients are not finite, as the fp16 loss scaler does; older
            # DeepSpeed releases default to applying it.
            bf16 = ds_config.get("bf16") if isinstance(ds_config.get("bf16"), dict) else {}
            ds_config["bf16"] = {**bf16, "enabled": True, "check_grad_overflow": True}
        ds_config.pop("train_batch_size", None)
        return accelerator
    # Without CUDA, accelerate only picks its multi-process CPU mode (gloo) when told cpu=True.
    return Accelerator(cpu=not cuda, mixed_precision=shape.mixed_precision,
                       gradient_accumulation_steps=shape.gradient_accumulation_steps)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def renders_in_lockstep(accelerator: Accelerator) -> bool:
    """Whether every rank must run the same forward calls of the trained model outside training (sample
    images): under ZeRO-3 each layer's weights are gathered from all ranks as it runs, a collective."""
    return zero_stage(accelerator) == 3


def world(accelerator: Accelerator) -> World:
    return World(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index,
                 accelerator.is_main_process, accelerator.device)


class CommCounter:
    """Bytes this rank all-reduced through DDP's gradient buckets (a DDP communication hook)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.hook = self._make_hook()

    def _make_hook(self):  # type: ignore[no-untyped-def]
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # DDP compares a hook's annotations with dist.GradBucket; this module's annotations are strings
        # (postponed evaluation), so the hook carries none.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            buffer = bucket.buffer()
            self.bytes += buffer.numel() * buffer.element_size()
            return allreduce_hook(state, bucket)

        return hook

    def take(self) -> int:
        counted, self.bytes = self.bytes, 0
        return counted


def prepare(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
            count_comm: bool = False) -> tuple[Any, Any, CommCounter | None]:
    """Wrap the single trained module and its optimizer; frozen models are never passed here.
    With ``count_comm`` under DDP, also count the gradient bytes all-reduced."""
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = None
    if count_comm and isinstance(model, nn.parallel.DistributedDataParallel):
        counter = CommCounter()
        model.register_comm_hook(None, counter.hook)
    return model, optimizer, counter


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    return accelerator.unwrap_model(model)


def forward_module(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The module to run a forward pass outside training (validation): the bare module, without DDP's
    hooks and buffer broadcasts, except under ZeRO-3, whose engine gathers the sharded weights."""
    return model if zero_stage(accelerator) == 3 else unwrap(accelerator, model)


def gradient_norm(accelerator: Accelerator, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Unscale (fp16), clip when ``max_norm`` > 0, and return the total gradient norm as a device tensor,
    never read back here: a non-finite norm is the one fused "gradients not finite" flag of the step.
    Not for DeepSpeed, whose engine unscales, clips and checks inside its own step."""
    accelerator.unscale_gradients()
    # clip_grad_norm_ computes the norm with foreach kernels and scales by min(1, max/norm) on the
    # device; with max_norm = inf the scale is exactly 1.
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def nonfinite_gradient_flag(accelerator: Accelerator, params: list[nn.Parameter], max_norm: float,
                            device: torch.device) -> torch.Tensor:
    """Unscale and clip this rank's gradients; 1.0 (a device tensor, not read back) when their norm is not
    finite. 0.0 under DeepSpeed, whose engine clips and checks inside its own step."""
    if uses_deepspeed(accelerator):
        return torch.zeros((), device=device)
    norm = gradient_norm(accelerator, params, max_norm)
    return (~torch.isfinite(norm)).float().to(device, non_blocking=True)  # already there: a no-op


def loss_scaling(accelerator: Accelerator) -> bool:
    """Whether an fp16 loss scaler (torch's or DeepSpeed's) handles gradient overflow."""
    return accelerator.mixed_precision == "fp16"


def finish_step(accelerator: Accelerator, model: Any, optimizer: Any, *, loss_finite: bool,
                gradients_finite: bool) -> bool:
    """Apply or skip the update of an accumulation window, alike on every rank (both flags are the
    all-reduced values). Returns whether the update was applied.

    DeepSpeed stepped inside backward() already and reports what it did. Elsewhere a non-finite loss
    skips the step; non-finite gradients skip it too unless the fp16 loss scaler owns overflow (it
    skips the update itself and halves its scale)."""
    if uses_deepspeed(accelerator):
        return engine_step_applied(accelerator, model)
    if not loss_finite or (not gradients_finite and accelerator.scaler is None):
        discard_step(accelerator)
        return False
    return optimizer_step(optimizer)


def optimizer_step(optimizer: Any) -> bool:
    """Step the optimizer; under fp16 the loss scaler skips a step whose gradients overflowed and halves
    its scale. Returns whether the update was applied."""
    optimizer.step()
    return not bool(getattr(optimizer, "step_was_skipped", False))


def discard_step(accelerator: Accelerator) -> None:
    """Drop this step's gradients without an update. Under fp16 the loss scaler's bookkeeping for the
    step (begun by unscaling) is closed: it backs off if the gradients overflowed."""
    if accelerator.scaler is not None:
        accelerator.scaler.update()


def engine_step_applied(accelerator: Accelerator, model: Any) -> bool:
    """DeepSpeed steps inside backward() and skips a step whose gradients overflowed or are not finite
    (fp16 loss scaling; bf16 with check_grad_overflow; an invalid norm otherwise), clearing its
    gradient buffers. True elsewhere: there the loop decides."""
    return bool(model.was_step_applied()) if uses_deepspeed(accelerator) else True


def loss_scale(accelerator: Accelerator, model: Any) -> float | None:
    """The current fp16 loss scale (a device-to-host read: call only when a step was skipped)."""
    if uses_deepspeed(accelerator):
        scale = getattr(getattr(model, "optimizer", None), "loss_scale", None)
        return float(scale) if scale is not None and accelerator.mixed_precision == "fp16" else None
    return float(accelerator.scaler.get_scale()) if accelerator.scaler is not None else None


def sum_tensor_across_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """One all-reduce (sum) of a small device tensor; the caller reads it back once."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction="sum")


@contextlib.contextmanager
def full_parameters(accelerator: Accelerator, params: list[nn.Parameter]) -> Iterator[None]:
    """Make ``params`` whole on every rank for the duration (ZeRO-3 shards them); call on all ranks."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def master_weights(accelerator: Accelerator, params: list[nn.Parameter]) -> Iterator[None]:
    """Make ``params`` whole on every rank and hold their full-precision values for the duration; call on
    all ranks (a collective under ZeRO-3).

    Under DeepSpeed bf16/fp16 the module runs on a low-precision copy and the trained fp32 values live
    in the optimizer: exports and checkpoints read those. Elsewhere the adapters are fp32 already."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from deepspeed.utils import safe_get_full_fp32_param

    masters = [safe_get_full_fp32_param(p) for p in params]
    if any(m is None for m in masters):  # fp32 engine: the module holds the values itself
        with full_parameters(accelerator, params):
            yield
        return
    kept = [p.data for p in params]
    for param, master in zip(params, masters, strict=True):
        param.data = master
    try:
        yield
    finally:
        for param, data in zip(params, kept, strict=True):
            param.data = data


@contextlib.contextmanager
def editable_master_weights(accelerator: Accelerator, params: list[nn.Parameter]) -> Iterator[None]:
    """As :func:`master_weights`, and what the block writes into ``params`` in place becomes their trained
    value; call on all ranks, every rank writing the same values.

    Under DeepSpeed the written values go to the optimizer's fp32 master copy (else its next step would
    restore the old values) and to the module's own copy (else the next forward would still use them)."""
    if not uses_deepspeed(accelerator):
        yield
        return
    with master_weights(accelerator, params):
        yield
        edited = [p.data for p in params]
    _write_master_weights(params, edited)


def _write_master_weights(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for param, value in zip(params, values, strict=True):
        if not hasattr(param, "ds_id"):  # ZeRO-1/2: every rank holds the whole module copy
            safe_set_full_fp32_param(param, value)
            param.data.copy_(value)
            continue
        # ZeRO-3: this rank's slice of the flattened value, padded at the end as DeepSpeed partitions it.
        # (safe_set_full_fp32_param cuts the last rank's slice past the end when the size does not divide.)
        local = param.ds_tensor
        group = param.ds_process_group
        rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        flat = torch.nn.functional.pad(value.detach().flatten(), (0, local.numel() * size - value.numel()))
        part = flat.narrow(0, local.numel() * rank, local.numel())
        safe_set_local_fp32_param(param, part)
        local.data.copy_(part)
        if param.data.numel() == value.numel():  # a small parameter ZeRO-3 keeps gathered between steps
            param.data.copy_(value)


def sum_across_ranks(accelerator: Accelerator, values: list[int]) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    return list(gather_object([value]))


def barrier(accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()


def save_engine_state(accelerator: Accelerator, model: Any, optimizer: Any, folder: str) -> None:
    """Optimizer (and, under DeepSpeed, its engine) state into ``folder``; call on all ranks.

    DDP: the main process writes the optimizer state. DeepSpeed: every rank writes its own partition
    (frozen parameters excluded, so a checkpoint holds the adapter's state, not the base model).
    """
    if uses_deepspeed(accelerator):
        model.save_checkpoint(folder, tag="engine", exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))


def load_engine_state(accelerator: Accelerator, model: Any, optimizer: Any, folder: str) -> None:
    if uses_deepspeed(accelerator):
        model.load_checkpoint(folder, tag="engine", load_module_strict=False, load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu",
                                             weights_only=True))
