"""What can stop a training step or a run: non-finite values, and the fault hooks that test it."""

from __future__ import annotations

import os

import torch


class NonFiniteRunError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward turns the incoming gradient into +inf (a simulated overflow)."""

    @staticmethod
    def forward(ctx: object, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return value.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(grad, float("inf"))


def _steps_for_rank(variable: str, rank: int) -> set[int]:
    spec = os.environ.get(variable, "")
    if not spec:
        return set()
    target, _, steps = spec.partition(":")
    return {int(s) for s in steps.split(",") if s} if int(target) == rank else set()


class FaultInjection:
    """Test hooks that exercise the non-finite guard and the loss scaler on real processes:
    ``DIST_LORA_INJECT_NAN="RANK:STEP[,STEP...]"`` makes that rank's loss NaN at those optimizer steps;
    ``DIST_LORA_INJECT_INF_GRAD="RANK:STEP[,...]"`` keeps the loss finite but makes its gradients inf
    (what an fp16 overflow in the backward pass looks like); ``DIST_LORA_INJECT_OOM="RANK:STEP"`` makes
    that rank run out of device memory there (one rank dying while the others wait in a collective)."""

    def __init__(self, rank: int) -> None:
        self.nan_steps = _steps_for_rank("DIST_LORA_INJECT_NAN", rank)
        self.inf_grad_steps = _steps_for_rank("DIST_LORA_INJECT_INF_GRAD", rank)
        self.oom_steps = _steps_for_rank("DIST_LORA_INJECT_OOM", rank)

    def apply(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if step in self.oom_steps:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step})")
        if step in self.nan_steps:
            return loss * float("nan")
        if step in self.inf_grad_steps:
            return _InfiniteGradient.apply(loss)  # type: ignore[no-any-return]
        return loss
