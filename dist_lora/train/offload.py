"""Frozen modules kept in host memory between uses (model.offload_frozen): the VAE and frozen text
encoders of a run without cached latents / text live in (pinned) CPU memory and are copied to the
device only while they encode, so the UNet's forward and backward never share the device with them.

The host copy of every parameter and buffer is made once and never written again (these modules are
frozen), so bringing a module back is one host-to-device copy and sending it away is dropping the device
copy: nothing is copied back. The device copy is always a distinct tensor, the device being the CPU
included, so where a module's weights are is visible from their storage alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class FrozenOffload:
    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"  # pinned pages make the copy asynchronous and at full link speed
        # (owning module, slot name, is a parameter) -> host copy; parameters keep their identity (the
        # optimizer, hooks and peft hold them), only their .data is pointed elsewhere.
        self._home: dict[int, list[tuple[nn.Module, str, bool, torch.Tensor]]] = {}
        for module in modules:
            slots = []
            for owner in module.modules():
                for name, param in owner._parameters.items():
                    if param is not None:
                        home = param.detach().to("cpu")
                        slots.append((owner, name, True, home.pin_memory() if pin else home))
                for name, buffer in owner._buffers.items():
                    if buffer is not None:
                        home = buffer.to("cpu")
                        slots.append((owner, name, False, home.pin_memory() if pin else home))
            self._home[id(module)] = slots
            self._point(module, lambda tensor: tensor)
        self._depth: dict[int, int] = dict.fromkeys(self._home, 0)

    def manages(self, module: nn.Module | None) -> bool:
        return module is not None and id(module) in self._home

    def _point(self, module: nn.Module, place: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for owner, name, is_param, home in self._home[id(module)]:
            tensor = place(home)
            if is_param:
                owner._parameters[name].data = tensor  # type: ignore[union-attr]
            else:
                owner._buffers[name] = tensor

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module | None) -> Iterator[None]:
        """The given managed modules on the device for the block (nested uses copy once); others pass."""
        entered = [m for m in modules if self.manages(m)]
        for module in entered:
            assert module is not None
            if self._depth[id(module)] == 0:
                self._point(module, lambda home: home.to(self.device, copy=True, non_blocking=True))
            self._depth[id(module)] += 1
        try:
            yield
        finally:
            for module in entered:
                assert module is not None
                self._depth[id(module)] -= 1
                if self._depth[id(module)] == 0:
                    # Dropping the device copy frees it; kernels already queued on the stream that read it
                    # run before the caching allocator hands the memory to anything later on that stream.
                    self._point(module, lambda home: home)

    def is_home(self, module: nn.Module) -> bool:
        """Every parameter and buffer of ``module`` is its host copy (the module is offloaded)."""
        return all((owner._parameters[name] if is_param else owner._buffers[name]).data_ptr()  # type: ignore[union-attr]
                   == home.data_ptr() for owner, name, is_param, home in self._home[id(module)])


@contextlib.contextmanager
def maybe_on_device(offload: FrozenOffload | None, *modules: nn.Module | None) -> Iterator[None]:
    with offload.on_device(*modules) if offload is not None else contextlib.nullcontext():
        yield
