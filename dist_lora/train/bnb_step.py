"""bitsandbytes' optimizer step without its device synchronisation after every parameter.

bitsandbytes 0.45-0.50 ends each parameter's update in ``Optimizer8bit.step`` with ``sync_gpu(p)``, a
``torch.cuda.synchronize()``: for an SDXL LoRA's 1,444 adapter tensors that is 1,444 host waits per step,
each draining the GPU's queue. Its update kernels are launched on the legacy default stream (stream 0,
no stream argument); when PyTorch's current stream is that same stream, every later kernel that reads the
parameters or the optimizer state is queued behind the update anyway, so the waits order nothing. The
step below is bitsandbytes' own loop, calling the same methods, without them. Paged optimizers (whose
state migrates with unified memory, prefetched on stream 0) and work on any other stream keep
bitsandbytes' step, synchronisation included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _unsynced_step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
    if self.is_paged or not _on_legacy_default_stream(self):
        return self._bitsandbytes_step(closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
    return loss


def _on_legacy_default_stream(optimizer: torch.optim.Optimizer) -> bool:
    """The parameters' device runs PyTorch's work on stream 0, where bitsandbytes launches its kernels (a
    CPU's ops run in program order)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type == "cuda":
                return bool(torch.cuda.current_stream(p.device).cuda_stream == 0)
            if p.device.type != "cpu":
                return False
    return True


_UNSYNCED: dict[type, type] = {}


def without_per_parameter_sync(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` (a bitsandbytes 8-bit / Lion optimizer) with the step above; any other optimizer is
    returned as it is. The instance keeps its state and parameter groups; only its class changes, to a
    subclass of its own, so isinstance checks and state_dict round trips are unaffected."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return optimizer
    cls = type(optimizer)
    if not isinstance(optimizer, Optimizer8bit) or cls in _UNSYNCED.values():
        return optimizer
    if cls not in _UNSYNCED:
        # torch wraps each optimizer class's step once (step hooks, profiling); the fallback calls the
        # unwrapped original so the hooks run once.
        original = getattr(cls.step, "__wrapped__", cls.step)
        _UNSYNCED[cls] = type(cls.__name__, (cls,), {"step": _unsynced_step, "_bitsandbytes_step": original,
                                                      "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    optimizer.__class__ = _UNSYNCED[cls]
    optimizer._patch_step_function()  # type: ignore[attr-defined]
    return optimizer
