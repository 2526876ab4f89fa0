"""The two training steps the suite compares: the plainest correct LoRA step, and dist_lora's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu.context import Suite
from benchmarks.gpu.models import NETWORK
from dist_lora import parallel
from dist_lora.adapters.inject import compute_in_input_dtype, lora_parameters
from dist_lora.adapters.network import attach_network
from dist_lora.config import Config, NetworkConfig
from dist_lora.data.shards import Batch
from dist_lora.models.load import Components
from dist_lora.train.conditioning import Conditioner
from dist_lora.train.loop import TrainingLoop
from dist_lora.train.run_plan import RunPlan
from dist_lora.train.setup import build_setup
from dist_lora.train.state import TrainState
from dist_lora.train.step import StepRunner
from dist_lora.train.tracking import SampleKeyLog
from dist_lora.utils.stop_signals import StopSignals

Step = Callable[[], None]


def bare_step(suite: Suite, c: Components, batch: Batch, *, checkpointing: bool, fused: bool = False,
              channels_last: bool = False, compile_blocks: bool = False, xformers: bool = False,
              peft_input_cast: bool = False) -> Step:
    """The plainest correct LoRA step: batch-level draws, autocast, AdamW; no checks, no syncs. Like the
    trainer, the adapted layers compute in their input's dtype and the noise schedule lives on the device;
    ``peft_input_cast`` keeps peft's default fp32 copy of each adapted layer's input instead."""
    unet = c.unet.requires_grad_(False)
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    attach_network(unet, [], c.family, NetworkConfig(**NETWORK))
    params = lora_parameters(unet)
    for p in params:
        p.data = p.data.float()
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    if dtype != torch.float32 and not peft_input_cast:
        compute_in_input_dtype(unet)
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
    device = suite.device
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


class _LoaderStub:
    """What the loop reads from a loader between batches, for batches fed from memory."""

    def __init__(self) -> None:
        from dist_lora.data.position import EpochProgress
        from dist_lora.data.shards import DataStats

        self.stats, self.progress = DataStats(), EpochProgress()


class TrainerStep:
    """dist_lora's own step: build_setup, StepRunner and the TrainingLoop's micro-step and step end."""

    def __init__(self, suite: Suite, c: Components, batch: Batch, cfg: Config, run_name: str) -> None:
        accelerator = parallel.make_accelerator(parallel.TrainingShape(
            cfg.training.mixed_precision, 1, cfg.training.batch_size, cfg.optimizer.max_grad_norm,
            cfg.optimizer.type in ("adamw8bit", "paged_adamw8bit", "lion8bit")))
        world = parallel.world(accelerator)
        total = 10**9
        setup = build_setup(cfg, c, accelerator, total)
        run_dir = suite.work / f"run_{run_name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        scaling = 0.13025 if c.family == "sdxl" else 0.18215
        conditioner = Conditioner(setup.components, accelerator.device, setup.weight_dtype,
                                  setup.frozen_text_encoders, accelerator.autocast, scaling)
        self.loop = TrainingLoop(cfg, setup, StepRunner(cfg, setup, conditioner, world), accelerator, world,
                                 _LoaderStub(), RunPlan(total, [total]), TrainState(),  # type: ignore[arg-type]
                                 [], SampleKeyLog(run_dir, enabled=False), StopSignals())
        self.batch = batch
        self.unet: Any = setup.components.unet
        setup.model.train()

    def __call__(self) -> None:
        self.loop._micro_step(self.batch, 0, self.loop.state.batch_in_epoch)
        self.loop._end_of_step(0)
