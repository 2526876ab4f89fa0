"""Runs `dist-lora train` with every host read of a tensor and every Python-level collective counted.

Launched as a script (plain, or under `accelerate launch`); writes ``$COUNT_SYNCS_OUT/rank<R>.json``:
one entry per optimizer step with the reads and collectives made since the previous step ended, and
where each read came from. DDP's own gradient all-reduce runs in C++ and is not counted: it is the
step's work, not an overhead.
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


for name in READS:
    setattr(torch.Tensor, name, _count("reads", name, getattr(torch.Tensor, name)))
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
