"""Runs `dist-lora train` with every host-device synchronisation and every Python-level collective counted.

Launched as a script (plain, or under `accelerate launch`); writes ``$COUNT_SYNCS_OUT/rank<R>.json``:
one entry per optimizer step with the synchronisations and collectives made since the previous step
ended, and where each came from. DDP's own gradient all-reduce runs in C++ and is not counted: it is
the step's work, not an overhead.

Counted as synchronisations, what CUDA's sync-debug mode (``torch.cuda.set_sync_debug_mode``) reports
on a GPU, caught here on the CPU by what the code calls rather than by what a device did:
- reads of a tensor on the host (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``.numpy()``, ``.cpu()``);
- blocking copies to a device (``.to(device)``, ``.to(tensor)``, ``.cuda()``, ``.copy_()`` without
  ``non_blocking=True``): on a GPU each one waits for the stream (the training device is the CPU here, so
  any ``.to`` that names a device counts, whatever that device is);
- explicit waits: ``torch.cuda.synchronize``, ``Stream.synchronize``, ``Event.synchronize``, and
  bitsandbytes' ``sync_gpu`` (a ``torch.cuda.synchronize`` for any tensor on a GPU).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lora.cli import main
from dist_lora.train import loop

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
COPIES = ("to", "cuda", "copy_")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "gather", "gather_object", "scatter",
               "reduce_scatter_tensor")
counts: Counter[str] = Counter()
origins: Counter[str] = Counter()
steps: list[dict] = []


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "dist_lora" in frame.filename or "accelerate" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "other"


def _reads_host_state() -> bool:
    """torch.optim keeps each parameter's step counter on the host (unless capturable or fused) and
    reads it there: on a GPU that read does not wait for the device, so it is not a synchronisation."""
    return "torch/optim/" in traceback.extract_stack()[-3].filename


def _count(kind: str, name: str, original):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kind == "reads" and _reads_host_state():
            return original(*args, **kwargs)
        counts[kind] += 1
        origins[f"{kind} {name} {_caller()}"] += 1
        return original(*args, **kwargs)

    return wrapper


def _names_a_device(name: str, args: tuple, kwargs: dict) -> bool:  # type: ignore[type-arg]
    """A blocking copy to a device: ``.cuda()`` / ``.copy_(src)``, or ``.to`` given a device or a tensor (not
    a dtype alone), without non_blocking=True."""
    if kwargs.get("non_blocking") or (name == "to" and len(args) > 2 and args[2] is True):
        return False
    if name in ("cuda", "copy_"):
        return name == "cuda" or (isinstance(args[1], torch.Tensor) and args[1].device != args[0].device)
    targets = [*args[1:2], kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(t, (torch.device, str, int, torch.Tensor)) and not isinstance(t, bool) for t in targets)


def _from_our_side() -> bool:
    """Called by dist_lora or accelerate directly: libraries' own ``.to(x.device)`` of tensors already there
    (diffusers' timestep handling) are no copies on a GPU either."""
    caller = traceback.extract_stack()[-3].filename
    return "dist_lora" in caller or "accelerate" in caller


def _count_copies(name: str, original):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if _names_a_device(name, args, kwargs) and _from_our_side():
            counts["reads"] += 1
            origins[f"reads {name} {_caller()}"] += 1
        return original(*args, **kwargs)

    return wrapper


for name in READS:
    setattr(torch.Tensor, name, _count("reads", name, getattr(torch.Tensor, name)))
for name in COPIES:
    setattr(torch.Tensor, name, _count_copies(name, getattr(torch.Tensor, name)))
torch.cuda.synchronize = _count("reads", "cuda.synchronize", torch.cuda.synchronize)
torch.cuda.Stream.synchronize = _count("reads", "Stream.synchronize", torch.cuda.Stream.synchronize)
torch.cuda.Event.synchronize = _count("reads", "Event.synchronize", torch.cuda.Event.synchronize)
try:
    from bitsandbytes.optim import optimizer as bnb_optimizer

    bnb_optimizer.sync_gpu = _count("reads", "bitsandbytes.sync_gpu", bnb_optimizer.sync_gpu)
except ImportError:
    pass
for name in COLLECTIVES:
    setattr(dist, name, _count("collectives", name, getattr(dist, name)))

original_end = loop.TrainingLoop._end_of_step


def end_of_step(self, epoch, **kwargs):  # type: ignore[no-untyped-def]
    steps.append({"reads": counts["reads"], "collectives": counts["collectives"], "origins": dict(origins)})
    counts.clear()
    origins.clear()
    return original_end(self, epoch, **kwargs)


loop.TrainingLoop._end_of_step = end_of_step  # type: ignore[method-assign]

if __name__ == "__main__":
    status = main(["train", *sys.argv[1:]])
    out = Path(os.environ["COUNT_SYNCS_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps, indent=1))
    raise SystemExit(status)
