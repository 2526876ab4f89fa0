"""Running trained modules for evaluation (sampling, validation) in the middle of training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (no adapter dropout) and the process's random state untouched, for the duration."""
    training = [m.training for m in modules]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in zip(modules, training, strict=True):
            module.train(was_training)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
