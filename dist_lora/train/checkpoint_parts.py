"""The resumable parts that live in the model and the process: the optimizer (or DeepSpeed engine),
the adapter weights and the RNG. Anything distributed goes through ``parallel``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dist_lora import parallel
from dist_lora.train.checkpoint import Checkpointer
from dist_lora.train.checkpoint_format import CheckpointError, SavedRanks, Storage
from dist_lora.train.setup import Setup


class EngineState:
    """The optimizer state (and under DeepSpeed the engine's partitions, one file set per rank)."""

    def __init__(self, accelerator: Accelerator, model: Any, optimizer: Any) -> None:
        self.acc, self.model, self.optimizer = accelerator, model, optimizer

    def save_to(self, folder: Path) -> None:
        parallel.save_engine_state(self.acc, self.model, self.optimizer, str(folder))

    def load_from(self, folder: Path) -> None:
        parallel.load_engine_state(self.acc, self.model, self.optimizer, str(folder))


def trained_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class AdapterWeights:
    """The trained parameters in fp32, by name; whole on the main rank even when ZeRO-3 shards them."""

    def __init__(self, accelerator: Accelerator, trained: nn.Module) -> None:
        self.acc, self.named = accelerator, dict(trained_parameters(trained))

    def state_dict(self) -> dict[str, Any]:
        params = list(self.named.values())
        with parallel.master_weights(self.acc, params):  # collective under ZeRO-3
            if not self.acc.is_main_process:
                return {}
            return {n: p.detach().float().cpu().contiguous() for n, p in self.named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.named) - set(state))
        if missing:
            raise CheckpointError(f"the checkpoint does not match this network: no state for {missing[:3]} "
                                  f"({len(missing)} of {len(self.named)} parameters). Resume with the network "
                                  f"settings it was written with.")
        with parallel.full_parameters(self.acc, list(self.named.values())), torch.no_grad():
            for name, param in self.named.items():
                param.copy_(state[name].to(param.dtype))


class RngState:
    """This process's CPU generator. Training noise is keyed per sample and needs none; what else draws
    from the global generator (dropout in a trained text encoder) continues as uninterrupted."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state()}

    def load_rank_states(self, saved: SavedRanks) -> None:
        own = saved.own()
        if own is not None:  # a rank the stopped run did not have keeps the seeded generator
            torch.set_rng_state(own["cpu"])


def register_training_parts(checkpointer: Checkpointer, accelerator: Accelerator, setup: Setup) -> None:
    """The parts that exist once the model is built, after the train state and data position. The adapter
    goes before the engine: a DeepSpeed engine's load sets the module's parameters last, as it saved them."""
    checkpointer.register("adapter_state", AdapterWeights(accelerator, parallel.unwrap(accelerator, setup.model)),
                          Storage.MAIN_TENSORS)
    checkpointer.register("engine", EngineState(accelerator, setup.model, setup.optimizer), Storage.FOLDER)
    checkpointer.register("lr_scheduler", setup.lr_scheduler, Storage.MAIN_TORCH)
    checkpointer.register("rng", RngState(), Storage.RANK_TENSORS, optional=True)
    if setup.ema is not None:
        checkpointer.register("ema", setup.ema, Storage.MAIN_TENSORS, optional=True)
