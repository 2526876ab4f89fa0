"""An exponential moving average of the trained adapter weights (diffusers' EMAModel), kept across
checkpoints so a resumed run averages exactly as an uninterrupted one, and swapped into the model
when a file is written or samples are rendered from it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from dist_lora.config import EmaConfig
from dist_lora.train.checkpoint_format import CheckpointError

log = logging.getLogger(__name__)


class AdapterEMA:
    """The average of ``params``, updated every ``update_every`` optimizer steps. Its decay warms up as
    diffusers' EMAModel does, min(decay, (1 + n) / (10 + n)) at the n-th update, so early weights
    (the untrained start) fade out quickly.

    It reads and writes the parameters' ``data`` as they are when called: under DeepSpeed the caller makes
    them the whole fp32 master weights first (creation, update, and a swap for a file)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: EmaConfig) -> None:
        # Names as the checkpoint's adapter_state.safetensors spells them: the saved average reads alike.
        self.names = [name for name, _ in named_params]
        self.params, self.cfg = [p for _, p in named_params], cfg
        self.average = EMAModel(self.params, decay=cfg.decay, foreach=True)

    def due(self, step: int) -> bool:
        """Whether the average takes the weights after optimizer step ``step``."""
        return step % self.cfg.update_every == 0

    @torch.no_grad()
    def update(self) -> None:
        """Average in the parameters' current values: EMAModel.step's arithmetic, done here because under
        ZeRO-3 that method gathers the parameters itself (over the fp32 values the caller put in place),
        through a deepspeed import that diffusers makes only if ZeRO-3 was on when it was imported."""
        average = self.average
        average.optimization_step += 1
        decay = average.get_decay(average.optimization_step)
        average.cur_decay_value = decay
        values = [p.detach() for p in self.params]
        torch._foreach_sub_(average.shadow_params, torch._foreach_sub(average.shadow_params, values),
                            alpha=1 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the trained ones, bit for bit, after it."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)
            self.average.temp_stored_params = None

    # -- a checkpoint part (MAIN_TENSORS) --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**{name: t.detach().float().cpu().contiguous()
                   for name, t in zip(self.names, self.average.shadow_params, strict=True)},
                "updates": self.average.optimization_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if set(weights) != set(self.names):
            differ = sorted(set(weights) ^ set(self.names))[:3]
            raise CheckpointError(f"it holds an average of another network ({len(weights)} tensors, this one has "
                                  f"{len(self.names)}; differing: {differ}). Resume with the network it was "
                                  f"written for.")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.average.shadow_params, strict=True):
                shadow.copy_(weights[name].to(shadow.dtype))
        self.average.optimization_step = int(state["updates"])

    def missing(self, folder: Path) -> None:
        """A checkpoint without an average (written before ema.decay was set): it restarts from the weights."""
        log.warning("checkpoint '%s' holds no weight average: ema starts again from the resumed weights", folder)
        self.average = EMAModel(self.params, decay=self.cfg.decay, foreach=True)
