"""The suite's rows, each a list of cases (one measurement each), most important first."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.context import RESOLUTION, Case, Suite
from benchmarks.gpu.measure import beside_plan, flops_fields, measured, planned, timed
from benchmarks.gpu.models import cached_batch, components, run_config, write_sd15_folder
from benchmarks.gpu.steps import TrainerStep, bare_step
from dist_lora import parallel
from dist_lora.config import config_from_dict

SUITE_SCRIPT = Path(__file__).resolve().parents[1] / "gpu_suite.py"


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- a: the bare loop against the trainer ------------------------------------------------------------------
def row_a(suite: Suite) -> list[Case]:
    return [Case(f"a_sdxl_b{batch}_gc{int(gc_on)}", lambda batch=batch, gc_on=gc_on: _loop_pair(suite, batch, gc_on))
            for batch in (1, 4) for gc_on in (False, True)]


def _loop_pair(suite: Suite, batch_size: int, checkpointing: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"batch": batch_size, "checkpointing": checkpointing}
    batch = cached_batch(suite, "sdxl", batch_size)
    plan = planned(suite, "sdxl", batch=batch_size, checkpointing=checkpointing)
    for which in ("bare", "dist_lora"):
        c = components(suite, "sdxl", torch.bfloat16)
        with measured(suite) as memory:
            if which == "bare":
                step: Any = bare_step(suite, c, batch, checkpointing=checkpointing)
                unet = c.unet
            else:
                step = TrainerStep(suite, c, batch, run_config(suite, batch=batch_size, checkpointing=checkpointing),
                                   f"a{batch_size}{int(checkpointing)}")
                unet = step.unet
            timing = timed(suite, step, batch_size)
        # Counted after the measured block: counting without checkpointing holds more activations.
        result[which] = {**timing, **beside_plan(memory, plan),
                         **flops_fields(suite, "sdxl", batch_size, step, unet, timing["step_s"])}
        del c, step, unet
        free()
    result["ratio_step_time"] = result["dist_lora"]["step_s"] / result["bare"]["step_s"]
    return result


# -- b: memory of latents and optimizers -------------------------------------------------------------------
def row_b(suite: Suite) -> list[Case]:
    variants = (("cached", "adamw"), ("online", "adamw"), ("cached", "adamw8bit"), ("cached", "paged_adamw8bit"))
    return [Case(f"b_sdxl_b1_gc1_{latents}_{optimizer}",
                 lambda latents=latents, optimizer=optimizer: _memory_case(suite, latents, optimizer))
            for latents, optimizer in variants]


def _memory_case(suite: Suite, latents: str, optimizer: str) -> dict[str, Any]:
    online = latents == "online"
    c = components(suite, "sdxl", torch.bfloat16, vae=online)
    batch = cached_batch(suite, "sdxl", 1, pixels=online)
    plan = planned(suite, "sdxl", batch=1, checkpointing=True, optimizer=optimizer, cached_latents=not online)
    with measured(suite) as memory:
        step = TrainerStep(suite, c, batch, run_config(suite, batch=1, checkpointing=True, optimizer=optimizer),
                           f"b{latents}{optimizer}")
        timing = timed(suite, step, 1)
    result = {"latents": latents, "optimizer": optimizer, "optimizer_used": step.loop.setup.optimizer_choice.used,
              **timing, **beside_plan(memory, plan),
              **flops_fields(suite, "sdxl", 1, step, step.unet, timing["step_s"])}
    del c, step
    free()
    return result


# -- c: switches on the bare loop --------------------------------------------------------------------------
def row_c(suite: Suite) -> list[Case]:
    switches: list[tuple[str, dict[str, bool]]] = [("sdpa", {}), ("channels_last", {"channels_last": True}),
                                                   ("peft_fp32_input_cast", {"peft_input_cast": True})]
    if suite.cuda:
        switches.append(("fused_adamw", {"fused": True}))  # CUDA only
    if suite.compile:  # minutes of compilation: only when asked
        switches.append(("compile_blocks", {"compile_blocks": True}))
    cases = [Case(f"c_sdxl_b4_{name}", lambda options=options: _switch_case(suite, options))
             for name, options in switches]
    try:
        import xformers.ops  # noqa: F401

        if suite.cuda:
            cases.append(Case("c_sdxl_b4_xformers", lambda: _switch_case(suite, {"xformers": True})))
    except Exception as exc:  # noqa: BLE001 - reported as a result
        reason = f"{type(exc).__name__}"
        cases.append(Case("c_sdxl_b4_xformers", lambda: {"status": "unavailable", "reason": reason}))
    return cases


def _switch_case(suite: Suite, options: dict[str, bool]) -> dict[str, Any]:
    import time

    c = components(suite, "sdxl", torch.bfloat16)
    batch = cached_batch(suite, "sdxl", 4)
    with measured(suite) as memory:
        step = bare_step(suite, c, batch, checkpointing=False, **options)
        began = time.perf_counter()
        step()  # compilation happens here for compile_blocks
        first_step_s = time.perf_counter() - began
        timing = timed(suite, step, 4)
    del c, step
    free()
    return {"first_step_s": first_step_s, **timing, **memory}


# -- d: the real loader ------------------------------------------------------------------------------------
def row_d(suite: Suite) -> list[Case]:
    batches = (8, 32) if suite.size == "full" else (4,)
    return [Case(f"d_sd15_b{batch}_w{workers}_jpeg",
                 lambda batch=batch, workers=workers: _loader_case(suite, batch, workers))
            for batch in batches for workers in (1, 4)]


def _loader_case(suite: Suite, batch_size: int, workers: int) -> dict[str, Any]:
    """SD 1.5 from JPEG shards through the real loader and trainer."""
    from dist_lora.data.prepare import PrepareOptions, prepare_dataset
    from dist_lora.data.synthetic import write_shapes_dataset
    from dist_lora.train.trainer import train

    side = RESOLUTION[suite.size]["sd15"]
    shards = suite.work / "sd15_shards"
    if not shards.exists():
        images = 64 if suite.size == "full" else 16
        source = write_shapes_dataset(suite.work / "sd15_src", images=images, size=side, repeats=4)
        # At least 8 shards: every one of up to 4 workers needs one.
        prepare_dataset(source, shards, PrepareOptions(resolution=side, image_format="jpg", shard_size=images // 8,
                                                       buckets=False))
    model = suite.work / "sd15_model"
    if not model.exists():
        write_sd15_folder(suite, model)
    cfg = config_from_dict({
        "model": {"pretrained": str(model)}, "data": {"shards": str(shards), "num_workers": workers},
        "network": {"rank": 16, "alpha": 16.0}, "optimizer": {"lr": 1e-5},
        "training": {"batch_size": batch_size, "max_steps": suite.warmup + suite.steps,
                     "mixed_precision": "bf16" if suite.cuda else "no"},
        "output": {"dir": str(suite.work / f"d_{batch_size}_{workers}"), "overwrite": True},
        "logging": {"progress_bar": False, "log_every": 1}})
    with measured(suite) as memory:
        result = train(cfg)
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()][suite.warmup:]
    step_s = sum(1.0 / x["steps_per_s"] for x in lines) / len(lines)
    free()
    return {"batch": batch_size, "workers": workers, "step_s": step_s, "img_per_s": batch_size / step_s, **memory}


# -- e: fp16 overflow recovery -----------------------------------------------------------------------------
def row_e(suite: Suite) -> list[Case]:
    return [Case("e_sdxl_fp16_overflow", lambda: _overflow_case(suite))]


def _overflow_case(suite: Suite) -> dict[str, Any]:
    """Inf gradients injected at steps 3 and 4: the loss scale halves twice and training continues."""
    c = components(suite, "sdxl", torch.float16 if suite.cuda else torch.float32)
    batch = cached_batch(suite, "sdxl", 1)
    cfg = run_config(suite, batch=1, checkpointing=True, precision="fp16")
    os.environ["DIST_LORA_INJECT_INF_GRAD"] = "0:3,4"
    restore = None
    try:
        if not suite.cuda:  # the CPU stand-in for CUDA's scaler, as the tests use
            restore = (parallel.check_launch, parallel.make_accelerator)
            parallel.check_launch = lambda shape: None  # type: ignore[assignment]
            original = restore[1]

            def with_scaler(shape: parallel.TrainingShape) -> Any:
                accelerator = original(shape)
                accelerator.native_amp = True
                accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
                return accelerator

            parallel.make_accelerator = with_scaler  # type: ignore[assignment]
        step = TrainerStep(suite, c, batch, cfg, "e")
        scales = []
        for _ in range(6):
            step()
            scales.append(float(step.loop.acc.scaler.get_scale()))
        finite = all(bool(torch.isfinite(p).all()) for p in step.loop.setup.trainable_params)
    finally:
        os.environ.pop("DIST_LORA_INJECT_INF_GRAD", None)
        if restore is not None:
            parallel.check_launch, parallel.make_accelerator = restore  # type: ignore[assignment]
    result = {"scales": scales, "loss_scale_skips": step.loop.state.loss_scale_skips, "adapters_finite": finite,
              "losses": step.loop.losses}
    del c, step
    free()
    return result


# -- f: DeepSpeed ZeRO on one device -----------------------------------------------------------------------
def row_f(suite: Suite) -> list[Case]:
    return [Case(f"f_sdxl_zero{stage}_gc1", lambda stage=stage: _zero_case(suite, stage))
            for stage in suite.zero_stages]


def _zero_case(suite: Suite, stage: int) -> dict[str, Any]:
    """In a child process: DeepSpeed takes the process's distributed state."""
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
           "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + stage)}
    child = subprocess.run([sys.executable, str(SUITE_SCRIPT), "--size", suite.size, "--device", str(suite.device),
                            "--child-zero", str(stage), "--steps", str(suite.steps), "--warmup", str(suite.warmup),
                            "--work", str(suite.work), "--time-limit", str(max(30, int(suite.seconds_left())))],
                           env=env, capture_output=True, text=True, timeout=max(60, int(suite.seconds_left()) + 30))
    if child.returncode != 0:
        status = "oom" if "OutOfMemoryError" in child.stderr else "failed"
        return {"status": status, "error": child.stderr[-2000:]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def zero_child(suite: Suite, stage: int) -> dict[str, Any]:
    precision = "bf16" if suite.cuda else "no"
    c = components(suite, "sdxl", torch.bfloat16)
    batch = cached_batch(suite, "sdxl", 1)
    plan = planned(suite, "sdxl", batch=1, checkpointing=True, precision=precision, zero_stage=stage)
    with measured(suite) as memory:
        step = TrainerStep(suite, c, batch, run_config(suite, batch=1, checkpointing=True, precision=precision),
                           f"f{stage}")
        timing = timed(suite, step, 1)
    return {"zero_stage": stage, **timing, **beside_plan(memory, plan)}


# -- g: a frozen base in fp8 or 4-bit ----------------------------------------------------------------------
def row_g(suite: Suite) -> list[Case]:
    return [Case(f"g_sdxl_b1_gc1_{base}_base", lambda base=base: _base_case(suite, base)) for base in ("fp8", "nf4")]


def _base_case(suite: Suite, base_dtype: str) -> dict[str, Any]:
    c = components(suite, "sdxl", torch.bfloat16)
    batch = cached_batch(suite, "sdxl", 1)
    plan = planned(suite, "sdxl", batch=1, checkpointing=True, base_dtype=base_dtype)
    with measured(suite) as memory:
        step = TrainerStep(suite, c, batch, run_config(suite, batch=1, checkpointing=True, base_dtype=base_dtype),
                           f"g{base_dtype}")
        timing = timed(suite, step, 1)
    result = {"base_dtype": base_dtype, **timing, **beside_plan(memory, plan),
              **flops_fields(suite, "sdxl", 1, step, step.unet, timing["step_s"])}
    del c, step
    free()
    return result


ROWS = {"a": row_a, "b": row_b, "c": row_c, "d": row_d, "e": row_e, "f": row_f, "g": row_g}
DEFAULT_ROWS = "a,b,e,f,g"  # c and d (switches, the loader) when asked
