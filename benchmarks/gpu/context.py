"""What every row of the suite shares: the device, the time budget, the models, the results so far."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12}
RESOLUTION = {"full": {"sdxl": 1024, "sd15": 512}, "tiny": {"sdxl": 64, "sd15": 64}}
# The fewest timed steps a measurement is cut to when the time limit comes near.
MIN_TIMED_STEPS = 3


@dataclass(frozen=True)
class Case:
    """One measurement of a row: its result name and what runs it (returns the result's fields)."""

    name: str
    run: Callable[[], dict[str, Any]]


@dataclass
class Suite:
    size: str
    device: torch.device
    out: Path
    deadline: float
    steps: int
    warmup: int
    work: Path
    compile: bool = False
    zero_stages: tuple[int, ...] = (2, 3)
    rows: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    # FLOPs of one training step without recomputation, by (arch, batch): what MFU divides by.
    model_flops: dict[tuple[str, int], int] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # built models and measured model sizes, by key

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.env, "size": self.size, "rows": self.rows}, indent=1))


def tf32_state() -> dict[str, Any]:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def set_tf32(state: dict[str, Any]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = state["matmul"]
    torch.backends.cudnn.allow_tf32 = state["cudnn"]
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def environment(device: torch.device) -> dict[str, Any]:
    import accelerate
    import diffusers
    import peft

    info: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": platform.node(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "device": str(device),
                            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                         "accelerate": accelerate.__version__, "peft": peft.__version__,
                                         "cuda": torch.version.cuda}}
    try:
        import bitsandbytes

        info["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory=props.total_memory,
                    driver=_driver_version(), peak_bf16_flops=peak_flops(props.name))
    return info


def _driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
