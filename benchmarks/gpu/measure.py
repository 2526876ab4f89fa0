"""How the suite measures: step time from CUDA events, peak memory, FLOPs, and the plan's prediction."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.gpu.context import MIN_TIMED_STEPS, RESOLUTION, Suite, peak_flops
from benchmarks.gpu.models import NETWORK, config_folder
from dist_lora.config import NetworkConfig


@contextlib.contextmanager
def measured(suite: Suite) -> Iterator[dict[str, Any]]:
    """Peak memory of the block (and device total minus free at its end)."""
    result: dict[str, Any] = {}
    if suite.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield result
    if suite.cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        result.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                      device_used=total - free)


def _sync(suite: Suite) -> None:
    if suite.cuda:
        torch.cuda.synchronize()


def timed(suite: Suite, step: Callable[[], None], images_per_step: int) -> dict[str, Any]:
    """Seconds per step over ``suite.steps`` steps after ``suite.warmup``; fewer (not under
    MIN_TIMED_STEPS) when the warm-up shows that all of them would pass the time limit."""
    began = time.perf_counter()
    for _ in range(suite.warmup):
        step()
    _sync(suite)
    per_step = (time.perf_counter() - began) / max(suite.warmup, 1)
    steps = suite.steps
    if per_step * steps > suite.seconds_left():
        steps = max(MIN_TIMED_STEPS, int(suite.seconds_left() / max(per_step, 1e-9)))
    if suite.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - began
    return {"step_s": seconds / steps, "img_per_s": images_per_step * steps / seconds, "timed_steps": steps}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` as it runs (a checkpointed forward counts twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def checkpointing_off(unet: Any) -> Iterator[None]:
    was_on = bool(unet.is_gradient_checkpointing)
    if was_on:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was_on:
            unet.enable_gradient_checkpointing()


def flops_fields(suite: Suite, arch: str, batch: int, step: Callable[[], None], unet: Any,
                 step_s: float) -> dict[str, Any]:
    """MFU from the step's model FLOPs (forward and backward once: no recomputation, as MFU is defined) and,
    with checkpointing, hardware utilisation from the FLOPs that ran, recomputed forward included. Both
    against the data sheet's dense bf16 peak and against the bf16 matmul rate measured on this device."""
    key = (arch, batch)
    checkpointing = bool(unet.is_gradient_checkpointing)
    hardware = count_flops(step)
    if key not in suite.model_flops:
        if checkpointing:
            with checkpointing_off(unet):
                suite.model_flops[key] = count_flops(step)
        else:
            suite.model_flops[key] = hardware
    model = suite.model_flops[key]
    result: dict[str, Any] = {"model_flops_per_step": model, "hardware_flops_per_step": hardware}
    sheet = suite.env.get("peak_bf16_flops")
    matmul = suite.env.get("matmul_bf16_flops")
    result["mfu"] = model / step_s / sheet if sheet else None
    result["mfu_vs_matmul"] = model / step_s / matmul if matmul else None
    result["hfu"] = hardware / step_s / sheet if sheet and checkpointing else None
    return result


def matmul_bf16_flops(device: torch.device, side: int = 8192, repeats: int = 30) -> float | None:
    """The bf16 matmul rate this device reaches (FLOP/s): the realistic ceiling beside the data sheet's."""
    if device.type != "cuda":
        return None
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * side**3 * repeats / (start.elapsed_time(end) / 1000)


def datasheet_peak(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_properties(device).name) if device.type == "cuda" else None


def planned(suite: Suite, arch: str, *, batch: int, checkpointing: bool, precision: str = "bf16",
            optimizer: str = "adamw", cached_latents: bool = True, base_dtype: str = "auto",
            zero_stage: int = 0) -> dict[str, int]:
    """What ``dist-lora plan`` predicts for the case: its own measure_model and estimate."""
    from dist_lora.planning.estimate import RunSettings, estimate
    from dist_lora.planning.shapes import measure_model

    side = RESOLUTION[suite.size][arch]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
    key = ("sizes", arch, dtype)
    if key not in suite.cache:
        suite.cache[key] = measure_model(config_folder(suite, arch), NetworkConfig(**NETWORK), (side, side), dtype)
    run = RunSettings(batch_size=batch, gradient_accumulation_steps=1, mixed_precision=precision,
                      gradient_checkpointing=checkpointing, optimizer=optimizer, cached_latents=cached_latents,
                      cached_text=True, train_text_encoder=False, vae_fp32=False, zero_stage=zero_stage,
                      base_dtype=base_dtype)
    plan = estimate(suite.cache[key], run)
    return {"planned_allocated": plan.allocated, "planned_device_total": plan.device_total}


def beside_plan(measured_memory: dict[str, Any], plan: dict[str, int]) -> dict[str, Any]:
    """The measured peak and the planned one, and how far apart (measured / planned - 1)."""
    result: dict[str, Any] = {**measured_memory, **plan}
    if "max_allocated" in measured_memory:
        result["plan_error"] = measured_memory["max_allocated"] / plan["planned_allocated"] - 1
    return result
