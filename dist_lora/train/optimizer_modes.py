"""Schedule-free optimizers train at one point (y) and are meant to be evaluated, saved and exported at
another (the average x); their ``eval()`` / ``train()`` swap the weights between the two.

Sampling, validation, checkpoints and adapter files all see x: each runs inside ``averaged_weights``,
which swaps to x and back. A checkpoint thus holds x and the optimizer's state in eval mode, and the
loop calls ``train()`` before it steps: a resumed run rebuilds y from x exactly as the run it continues
did after that checkpoint, so the resume is bitwise. For every other optimizer both are no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _inner(optimizer: torch.optim.Optimizer) -> object:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def switches_weights(optimizer: torch.optim.Optimizer) -> bool:
    inner = _inner(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def to_training_point(optimizer: torch.optim.Optimizer) -> None:
    """The weights the next step trains at (a no-op when they already are)."""
    if switches_weights(optimizer):
        _inner(optimizer).train()  # type: ignore[attr-defined]


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    if not switches_weights(optimizer):
        yield
        return
    inner = _inner(optimizer)
    if not all(group.get("train_mode", True) for group in inner.param_groups):  # type: ignore[attr-defined]
        yield  # already at the average (nested): the outer block switches back
        return
    inner.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        inner.train()  # type: ignore[attr-defined]
