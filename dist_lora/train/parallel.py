"""The one module that knows how processes are distributed (accelerate: DDP today; DeepSpeed later).

Everything else asks it for the rank, the world size, a wrapped model or a cross-rank reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from torch import nn

from dist_lora.errors import DistLoraError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    is_main: bool
    device: torch.device


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int) -> Accelerator:
    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise DistLoraError("training.mixed_precision = 'fp16' needs a CUDA GPU (fp16 autocast with loss scaling); "
                         "use 'bf16' or 'no' on CPU.")
    if not torch.distributed.is_initialized():
        # A previous in-process run (tests, notebooks) leaves accelerate's singleton state behind;
        # it would refuse a different precision. Nothing is shared yet, so start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without CUDA, accelerate only picks its multi-process CPU mode (gloo) when told cpu=True.
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision,
                       gradient_accumulation_steps=gradient_accumulation_steps)


def world(accelerator: Accelerator) -> World:
    return World(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index,
                 accelerator.is_main_process, accelerator.device)


def prepare(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """Wrap the single trained module and its optimizer; frozen models are never passed here."""
    return accelerator.prepare(model, optimizer)


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    return accelerator.unwrap_model(model)


def mean_across_ranks(accelerator: Accelerator, value: torch.Tensor) -> float:
    return float(accelerator.reduce(value.detach().float().reshape(1), reduction="mean").item())


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    return list(gather_object([value]))


def barrier(accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()
