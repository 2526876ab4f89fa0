"""GPU benchmark suite: img/s, peak memory and MFU of dist_lora's training step against a bare loop.

    .venv/bin/python benchmarks/gpu_suite.py                       # full size on the GPU (about 9 minutes)
    .venv/bin/python benchmarks/gpu_suite.py --size tiny --device cpu --out /tmp/suite.json   # as the tests do

Full size builds SD 1.5 and SDXL from their published configs (dist_lora.models.reference) with random
weights, directly on the device in the compute dtype: nothing is downloaded. Rows:

  a  SDXL LoRA (rank 16, attn_ff, bf16): a bare PyTorch loop doing the same math (same UNet, adapters,
     batch, dtype; batch-level noise, no checks, no syncs) against dist_lora's own step (StepRunner and
     TrainingLoop: keyed per-sample draws, guard, metrics) on the same in-memory batch; batch 1 and 4,
     gradient checkpointing off and on. The ratio dist_lora / bare is the headline.
  b  peak memory at batch 1 with checkpointing: cached vs online latents; adamw, adamw8bit, paged_adamw8bit.
  c  switches on the bare loop: SDPA vs xformers (when installed), channels_last, regional torch.compile
     (compile time reported apart), fused AdamW, and without peft's fp32 copy of each adapted layer's
     input (what dist_lora does under autocast).
  d  SD 1.5 512^2 at batch 8 and 32 from JPEG shards through the real loader with 1 and 4 workers,
     against the same step fed from memory: is the loader the limit?
  e  fp16 overflow recovery: inf gradients injected at two steps; the loss scale halves twice and training
     continues.
  f  single-process DeepSpeed ZeRO-2 and ZeRO-3 with checkpointing (a child process each).

The JSON is written after every row; a row that runs out of memory is a result ("oom"); rows left when the
time limit is reached are marked "skipped". Metrics: img/s from CUDA events after warm-up; peak memory
(max_memory_allocated, max_memory_reserved, device total minus free); MFU = FLOPs of one step (counted with
torch.utils.flop_counter) x steps/s / the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_lora import parallel  # noqa: E402
from dist_lora.adapters.inject import compute_in_input_dtype, lora_parameters  # noqa: E402
from dist_lora.adapters.network import attach_network  # noqa: E402
from dist_lora.config import Config, NetworkConfig, config_from_dict  # noqa: E402
from dist_lora.data.shards import Batch  # noqa: E402
from dist_lora.models.load import Components, load_components  # noqa: E402
from dist_lora.models.reference import FULL_SIZE, sdxl_pooled_width  # noqa: E402
from dist_lora.models.tiny import write_tiny_pipeline  # noqa: E402
from dist_lora.train.conditioning import Conditioner  # noqa: E402
from dist_lora.train.loop import TrainingLoop  # noqa: E402
from dist_lora.train.run_plan import RunPlan  # noqa: E402
from dist_lora.train.setup import build_setup  # noqa: E402
from dist_lora.train.state import TrainState  # noqa: E402
from dist_lora.train.step import StepRunner  # noqa: E402
from dist_lora.train.tracking import SampleKeyLog  # noqa: E402
from dist_lora.utils.stop_signals import StopSignals  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12}
RESOLUTION = {"full": {"sdxl": 1024, "sd15": 512}, "tiny": {"sdxl": 64, "sd15": 64}}


@dataclass
class Suite:
    size: str
    device: torch.device
    out: Path
    deadline: float
    steps: int
    warmup: int
    work: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    tiny_models: dict[str, Path] = field(default_factory=dict)
    zero_stages: tuple[int, ...] = (2, 3)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**environment(self.device), "size": self.size, "rows": self.rows}, indent=1))


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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory=props.total_memory,
                    driver=_driver_version(), peak_bf16_flops=_peak_flops(props.name))
    return info


def _driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


# -- models and data ---------------------------------------------------------------------------------------
def components(suite: Suite, arch: str, dtype: torch.dtype, *, vae: bool = False) -> Components:
    """UNet (+ VAE) of ``arch``: the published architecture with random weights, or the tiny pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if suite.size == "tiny":
        if arch not in suite.tiny_models:
            suite.tiny_models[arch] = write_tiny_pipeline(arch, suite.work / f"tiny_{arch}")
        c = load_components(str(suite.tiny_models[arch]), load_text=False, load_vae=vae)
        c.unet.to(suite.device, dtype)
        if c.vae is not None:
            c.vae.to(suite.device)
        return c
    configs = FULL_SIZE[arch]
    with torch.device(suite.device):
        unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype)
        autoencoder = AutoencoderKL.from_config(configs["vae"]) if vae else None
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return Components("sdxl" if arch == "sdxl" else "sd1", "epsilon", [], [], autoencoder, unet, scheduler)


def cached_batch(suite: Suite, arch: str, batch: int, *, pixels: bool = False) -> Batch:
    """A batch as the loader yields it from a cache: latent posteriors and text-encoder outputs."""
    side = RESOLUTION[suite.size][arch]
    generator = torch.Generator().manual_seed(0)
    unet_cfg = (FULL_SIZE[arch]["unet"] if suite.size == "full" else
                json.loads((suite.tiny_models[arch] / "unet" / "config.json").read_text()))
    hidden = torch.randn(batch, 77, unet_cfg["cross_attention_dim"], generator=generator)
    pooled = None
    if arch == "sdxl":
        pooled = torch.randn(batch, sdxl_pooled_width(unet_cfg), generator=generator)
    metas = [{"original_size": [side, side], "crop_top_left": [0, 0], "target_size": [side, side]}] * batch
    common = {"keys": [f"s{i}" for i in range(batch)], "captions": [""] * batch, "metas": metas,
              "weights": torch.ones(batch), "hidden": hidden, "pooled": pooled}
    if pixels:
        return Batch(**common, pixels=torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8,
                                                    generator=generator))
    latent = torch.randn(batch, 4, side // 8, side // 8, generator=generator)
    return Batch(**common, latent_mean=latent, latent_std=torch.full_like(latent, 0.05))


def run_config(suite: Suite, arch: str, *, batch: int, checkpointing: bool, precision: str = "bf16",
               optimizer: str = "adamw") -> Config:
    return config_from_dict({
        "model": {"pretrained": "unused"}, "data": {"shards": "unused"},
        "network": {"rank": 16, "alpha": 16.0, "preset": "attn_ff"},
        "optimizer": {"type": optimizer, "lr": 1e-5},
        "training": {"batch_size": batch, "gradient_checkpointing": checkpointing, "mixed_precision": precision,
                     "max_steps": suite.warmup + suite.steps},
        "output": {"dir": str(suite.work / "run")}, "logging": {"progress_bar": False, "log_every": 10_000}})


# -- measuring ---------------------------------------------------------------------------------------------
class _LoaderStub:
    """What the loop reads from a loader between batches, for batches fed from memory."""

    def __init__(self) -> None:
        from dist_lora.data.position import EpochProgress
        from dist_lora.data.shards import DataStats

        self.stats, self.progress = DataStats(), EpochProgress()


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


def timed(suite: Suite, step: Callable[[], None], images_per_step: int) -> dict[str, float]:
    for _ in range(suite.warmup):
        step()
    if suite.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(suite.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        began = time.perf_counter()
        for _ in range(suite.steps):
            step()
        seconds = time.perf_counter() - began
    return {"step_s": seconds / suite.steps, "img_per_s": images_per_step * suite.steps / seconds}


def step_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def with_mfu(suite: Suite, result: dict[str, Any], flops: int) -> dict[str, Any]:
    peak = _peak_flops(torch.cuda.get_device_properties(suite.device).name) if suite.cuda else None
    result["flops_per_step"] = flops
    result["mfu"] = flops / result["step_s"] / peak if peak else None
    return result


# -- the two loops ------------------------------------------------------------------------------------------
def bare_step(suite: Suite, c: Components, batch: Batch, *, checkpointing: bool, fused: bool = False,
              channels_last: bool = False, compile_blocks: bool = False, xformers: bool = False,
              no_input_cast: bool = False) -> Callable[[], None]:
    """The plainest correct LoRA step: batch-level draws, autocast, AdamW; no checks, no syncs. peft
    casts each adapted layer's input to fp32 as it does by default, unless ``no_input_cast``."""
    unet = c.unet.requires_grad_(False)
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    attach_network(unet, [], c.family, NetworkConfig(rank=16, alpha=16.0, preset="attn_ff"))
    if no_input_cast:
        compute_in_input_dtype(unet)
    params = lora_parameters(unet)
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_blocks:
        for module in unet.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.compile()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused or None)
    device, dtype = suite.device, next(unet.parameters()).dtype
    latents = (batch.latent_mean * 0.13025).to(device, dtype)
    hidden = batch.hidden.to(device, dtype)  # type: ignore[union-attr]
    added = None
    if c.family == "sdxl":
        ids = torch.tensor([m["original_size"] + m["crop_top_left"] + m["target_size"] for m in batch.metas])
        added = {"text_embeds": batch.pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}  # type: ignore[union-attr]
    alphas = c.noise_scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(dtype)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with autocast:
            prediction = unet(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dist_lora_step(suite: Suite, c: Components, batch: Batch, cfg: Config) -> Callable[[], None]:
    """dist_lora's own step: build_setup, StepRunner and the TrainingLoop's micro-step and step end."""
    accelerator = parallel.make_accelerator(parallel.TrainingShape(
        cfg.training.mixed_precision, 1, cfg.training.batch_size, cfg.optimizer.max_grad_norm,
        cfg.optimizer.type in ("adamw8bit", "paged_adamw8bit", "lion8bit")))
    world = parallel.world(accelerator)
    total = 10**9
    setup = build_setup(cfg, c, accelerator, total)
    run_dir = suite.work / f"run_{len(suite.rows)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    scaling = 0.13025 if c.family == "sdxl" else 0.18215
    conditioner = Conditioner(setup.components, accelerator.device, setup.weight_dtype, setup.frozen_text_encoders,
                              accelerator.autocast, scaling)
    loop = TrainingLoop(cfg, setup, StepRunner(cfg, setup, conditioner, world), accelerator, world,
                        _LoaderStub(), RunPlan(total, [total]), TrainState(),  # type: ignore[arg-type]
                        [], SampleKeyLog(run_dir, enabled=False), StopSignals())
    setup.model.train()

    def step() -> None:
        index = loop.state.batch_in_epoch
        loop._micro_step(batch, 0, index)
        loop._end_of_step(0)

    step.loop = loop  # type: ignore[attr-defined]
    return step


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- rows ---------------------------------------------------------------------------------------------------
def row_a(suite: Suite) -> list[dict[str, Any]]:
    results = []
    for batch_size in (1, 4):
        for checkpointing in (False, True):
            row: dict[str, Any] = {"row": f"a_sdxl_b{batch_size}_gc{int(checkpointing)}", "batch": batch_size,
                                   "checkpointing": checkpointing}
            batch = None
            for which in ("bare", "dist_lora"):
                c = components(suite, "sdxl", torch.bfloat16)
                batch = batch or cached_batch(suite, "sdxl", batch_size)
                cfg = run_config(suite, "sdxl", batch=batch_size, checkpointing=checkpointing)
                with measured(suite) as memory:
                    step = (bare_step(suite, c, batch, checkpointing=checkpointing) if which == "bare"
                            else dist_lora_step(suite, c, batch, cfg))
                    timing = timed(suite, step, batch_size)
                row[which] = with_mfu(suite, {**timing, **memory}, step_flops(step))
                del c, step
                _free()
            row["ratio_step_time"] = row["dist_lora"]["step_s"] / row["bare"]["step_s"]
            results.append(row)
    return results


def row_b(suite: Suite) -> list[dict[str, Any]]:
    results = []
    for latents, optimizer in (("cached", "adamw"), ("online", "adamw"), ("cached", "adamw8bit"),
                               ("cached", "paged_adamw8bit")):
        c = components(suite, "sdxl", torch.bfloat16, vae=latents == "online")
        batch = cached_batch(suite, "sdxl", 1, pixels=latents == "online")
        cfg = run_config(suite, "sdxl", batch=1, checkpointing=True, optimizer=optimizer)
        with measured(suite) as memory:
            step = dist_lora_step(suite, c, batch, cfg)
            timing = timed(suite, step, 1)
        used = step.loop.setup.optimizer_choice.used  # type: ignore[attr-defined]
        results.append({"row": f"b_sdxl_b1_gc1_{latents}_{optimizer}", "latents": latents, "optimizer": optimizer,
                        "optimizer_used": used, **timing, **memory})
        del c, step
        _free()
    return results


def row_c(suite: Suite) -> list[dict[str, Any]]:
    results = []
    switches: list[tuple[str, dict[str, bool]]] = [("sdpa", {}), ("channels_last", {"channels_last": True}),
                                                   ("fused_adamw", {"fused": True}),
                                                   ("no_peft_input_cast", {"no_input_cast": True}),
                                                   ("compile_blocks", {"compile_blocks": True})]
    try:
        import xformers.ops  # noqa: F401

        if suite.cuda:
            switches.append(("xformers", {"xformers": True}))
    except Exception as exc:  # noqa: BLE001 - reported as a result
        results.append({"row": "c_sdxl_b4_xformers", "status": "unavailable", "reason": f"{type(exc).__name__}"})
    for name, options in switches:
        if name in ("fused_adamw", "compile_blocks") and not suite.cuda:
            continue  # fused AdamW is CUDA-only; inductor on CPU takes minutes to compile
        c = components(suite, "sdxl", torch.bfloat16)
        batch = cached_batch(suite, "sdxl", 4)
        with measured(suite) as memory:
            step = bare_step(suite, c, batch, checkpointing=False, **options)
            began = time.perf_counter()
            step()  # compilation happens here for compile_blocks
            first_step_s = time.perf_counter() - began
            timing = timed(suite, step, 4)
        results.append({"row": f"c_sdxl_b4_{name}", "first_step_s": first_step_s, **timing, **memory})
        del c, step
        _free()
    return results


def row_d(suite: Suite) -> list[dict[str, Any]]:
    """SD 1.5 through the real loader (JPEG shards) against the same step fed from memory."""
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
    results = []
    batches = (8, 32) if suite.size == "full" else (4,)
    for batch_size in batches:
        for workers in (1, 4):
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
            results.append({"row": f"d_sd15_b{batch_size}_w{workers}_jpeg", "batch": batch_size, "workers": workers,
                            "step_s": step_s, "img_per_s": batch_size / step_s, **memory})
            _free()
    return results


def write_sd15_folder(suite: Suite, folder: Path) -> None:
    """An SD 1.5 diffusers folder for the real trainer: random full-size weights, or the tiny pipeline."""
    if suite.size == "tiny":
        write_tiny_pipeline("sd15", folder)
        return
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dist_lora.models.tiny import write_tiny_pipeline as tiny

    tokenizer_source = tiny("sd15", suite.work / "tokenizer_source")
    configs = FULL_SIZE["sd15"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_source / "tokenizer"),
        unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def row_e(suite: Suite) -> list[dict[str, Any]]:
    """fp16 overflow recovery: inf gradients at steps 3 and 4."""
    c = components(suite, "sdxl", torch.float16 if suite.cuda else torch.float32)
    batch = cached_batch(suite, "sdxl", 1)
    cfg = run_config(suite, "sdxl", batch=1, checkpointing=True, precision="fp16")
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
        step = dist_lora_step(suite, c, batch, cfg)
        loop = step.loop  # type: ignore[attr-defined]
        scales = []
        for _ in range(6):
            step()
            scales.append(float(loop.acc.scaler.get_scale()))
        finite = all(bool(torch.isfinite(p).all()) for p in loop.setup.trainable_params)
    finally:
        os.environ.pop("DIST_LORA_INJECT_INF_GRAD", None)
        if restore is not None:
            parallel.check_launch, parallel.make_accelerator = restore  # type: ignore[assignment]
    return [{"row": "e_sdxl_fp16_overflow", "scales": scales, "loss_scale_skips": loop.state.loss_scale_skips,
             "adapters_finite": finite, "losses": loop.losses}]


def row_f(suite: Suite) -> list[dict[str, Any]]:
    results = []
    for stage in suite.zero_stages:
        env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
               "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + stage)}
        child = subprocess.run([sys.executable, __file__, "--size", suite.size, "--device", str(suite.device),
                                "--child-zero", str(stage), "--steps", str(suite.steps), "--warmup", str(suite.warmup),
                                "--work", str(suite.work)], env=env, capture_output=True, text=True,
                               timeout=max(60, int(suite.deadline - time.time())))
        if child.returncode != 0:
            status = "oom" if "OutOfMemoryError" in child.stderr else "failed"
            results.append({"row": f"f_sdxl_zero{stage}_gc1", "status": status, "error": child.stderr[-2000:]})
            continue
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return results


def zero_child(suite: Suite, stage: int) -> dict[str, Any]:
    c = components(suite, "sdxl", torch.bfloat16)
    batch = cached_batch(suite, "sdxl", 1)
    cfg = run_config(suite, "sdxl", batch=1, checkpointing=True, precision="bf16" if suite.cuda else "no")
    with measured(suite) as memory:
        step = dist_lora_step(suite, c, batch, cfg)
        timing = timed(suite, step, 1)
    return {"row": f"f_sdxl_zero{stage}_gc1", **timing, **memory}


ROWS: dict[str, Callable[[Suite], list[dict[str, Any]]]] = {"a": row_a, "b": row_b, "c": row_c, "d": row_d,
                                                            "e": row_e, "f": row_f}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="")
    parser.add_argument("--rows", default="a,b,c,d,e,f")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds; rows left after it are skipped")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 20 full, 3 tiny)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 5 full, 1 tiny)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--zero-stages", default="2,3", help="ZeRO stages of row f")
    parser.add_argument("--child-zero", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_properties(device).name.replace(" ", "_") if device.type == "cuda" else "cpu"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu_{name}.json")
    with tempfile.TemporaryDirectory() as scratch:
        full = args.size == "full"
        suite = Suite(args.size, device, out, time.time() + args.time_limit, args.steps or (20 if full else 3),
                      args.warmup or (5 if full else 1), Path(args.work or scratch),
                      zero_stages=tuple(int(x) for x in args.zero_stages.split(",")))
        if args.child_zero:
            print(json.dumps(zero_child(suite, args.child_zero)))
            return 0
        for key in args.rows.split(","):
            if time.time() > suite.deadline:
                suite.rows.append({"row": key, "status": "skipped", "reason": "time limit"})
            else:
                try:
                    suite.rows.extend({"status": "ok", **r} for r in ROWS[key](suite))
                except torch.OutOfMemoryError as exc:
                    suite.rows.append({"row": key, "status": "oom", "error": str(exc)[:500]})
                    _free()
                except Exception as exc:  # noqa: BLE001 - a failed row is a result; the others still run
                    suite.rows.append({"row": key, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    _free()
            suite.write()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
