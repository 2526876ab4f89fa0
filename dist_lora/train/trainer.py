"""The training loop: preflight checks, model set-up, steps, metrics and export."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from dist_lora import parallel
from dist_lora.adapters.diffusers_format import save_diffusers_lora
from dist_lora.adapters.inject import compute_in_input_dtype, lora_parameters
from dist_lora.adapters.kohya import SAVE_DTYPES, ExportInfo, kohya_tensors, save_kohya_lora
from dist_lora.adapters.network import attach_network, network_metadata
from dist_lora.config import Config, to_toml
from dist_lora.data.captions import CaptionTransform
from dist_lora.data.manifest import Manifest
from dist_lora.data.shards import Batch, ShardLoader, plan_epoch
from dist_lora.data.stream import pixels_to_unit_range
from dist_lora.errors import DistLoraError
from dist_lora.models.load import Components, ModelSource, inspect_model_source, load_components
from dist_lora.models.text import encode_prompts, tokenize
from dist_lora.train.diffusion import (
    add_noise,
    diffusion_loss,
    min_snr_weights,
    per_sample_noise,
    per_sample_normal,
    per_sample_timesteps,
    sample_generators,
    sdxl_time_ids,
    training_target,
)
from dist_lora.train.loop import TrainingLoop
from dist_lora.train.memory import OutOfMemory, out_of_memory_advice, set_attention
from dist_lora.train.model import AdaptedDenoiser
from dist_lora.train.optim import (
    BITSANDBYTES_OPTIMIZERS,
    OptimizerChoice,
    build_lr_scheduler,
    build_optimizer,
    param_groups,
)
from dist_lora.train.precision import WEIGHT_DTYPES, allow_tf32, device_mixed_precision
from dist_lora.train.run_plan import find_resume_point, plan_run
from dist_lora.train.tracking import MetricsLog, SampleKeyLog
from dist_lora.utils.files import check_writable_dir, write_text_atomic
from dist_lora.utils.stop_signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, Preempted, StopSignals, signal_hook


class RunSetupError(DistLoraError):
    """The run cannot start; raised before any model is loaded."""


@dataclass
class Preflight:
    source: ModelSource
    manifest: Manifest
    run_dir: Path
    adapter_path: Path
    captions: CaptionTransform
    use_latents: bool  # cached VAE posteriors are read; the VAE is not loaded
    use_text: bool  # cached text-encoder outputs are read; the text encoders are not loaded


@dataclass
class TrainResult:
    run_dir: Path
    adapter_path: Path
    config_path: Path
    metrics_path: Path
    steps: int
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None  # the trained AdaptedDenoiser (unwrapped), for in-process callers


def preflight(cfg: Config) -> Preflight:
    """Check every input that can be checked without loading a model."""
    source = inspect_model_source(cfg.model.pretrained, cfg.model.config_dir)
    manifest = Manifest.read(cfg.data.shards)
    run_dir = Path(cfg.output.dir)
    check_writable_dir(run_dir)
    adapter_path = run_dir / f"{cfg.output.name}.safetensors"
    if adapter_path.exists() and not cfg.output.overwrite:
        raise RunSetupError(f"'{adapter_path}' already exists; choose another output.dir / output.name or set "
                            f"output.overwrite=true.")
    if source.family is not None and cfg.model.base not in ("auto", source.family):
        raise RunSetupError(f"model.base = '{cfg.model.base}' but '{cfg.model.pretrained}' is a {source.family} "
                            f"model; set model.base = 'auto' or '{source.family}'.")
    d = cfg.data
    captions = CaptionTransform(d.shuffle_caption, d.keep_tokens, d.caption_dropout, d.tag_dropout, manifest.trigger)
    cache = manifest.cache if d.use_cache else None
    if cache is not None:
        family = cfg.model.base if cfg.model.base != "auto" else source.family
        if family is not None and family != cache.family:
            raise RunSetupError(f"data.shards '{manifest.root}' was cached with a {cache.family} model "
                                f"('{cache.model}') but model.pretrained is {family}; cache again with this model "
                                f"or set data.use_cache = false.")
    # Cached text outputs are fixed strings' encodings: caption transforms and a trained text encoder
    # need the encoders at every step, so the cache's text part is then ignored.
    use_text = bool(cache and cache.text) and not captions.active and not cfg.network.train_text_encoder
    # The data plan is checked here, before any model loads (too few shards, bad shard_urls).
    world_size = parallel.launched_world_size()
    manifest.urls(d.shard_urls)
    plan_epoch(manifest, seed=cfg.training.seed, epoch=0, rank=0, world_size=world_size,
               batch_size=cfg.training.batch_size, num_workers=d.num_workers)
    return Preflight(source, manifest, run_dir, adapter_path, captions, bool(cache and cache.latents), use_text)


def _scaling_factor(pre: Preflight) -> float:
    return pre.manifest.cache.scaling_factor if pre.use_latents and pre.manifest.cache else 0.0


@dataclass
class Setup:
    components: Components
    model: Any  # the prepared (possibly DDP-wrapped) AdaptedDenoiser
    optimizer: Any
    lr_scheduler: Any
    frozen_text_encoders: list[nn.Module]
    weight_dtype: torch.dtype
    trainable_params: list[nn.Parameter]
    optimizer_choice: OptimizerChoice
    comm: parallel.CommCounter | None = None


def _freeze(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    module.requires_grad_(False)
    current = next(module.parameters())
    if current.dtype != dtype:
        module.to(dtype=dtype)
    if current.device != device:
        module.to(device=device)


def build_setup(cfg: Config, components: Components, accelerator: Accelerator, total_steps: int) -> Setup:
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[cfg.training.mixed_precision]
    unet = components.unet
    if components.vae is not None:
        _freeze(components.vae, torch.float32 if cfg.training.vae_fp32 else weight_dtype, device)
    for module in [unet, *components.text_encoders]:
        _freeze(module, weight_dtype, device)
    set_attention(unet, cfg.training.attention, cfg.training.attention_fallback)
    attached = attach_network(unet, components.text_encoders, components.family, cfg.network)
    trained_encoders = attached.trained_text_encoders
    unet_params = lora_parameters(unet)
    text_params = [p for e in trained_encoders for p in lora_parameters(e)]
    for p in unet_params + text_params:
        p.data = p.data.float()  # adapters train in fp32 whatever the autocast precision
    if cfg.training.mixed_precision != "no":
        for module in [unet, *trained_encoders]:
            compute_in_input_dtype(module)
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trained_encoders:
            # Reentrant checkpointing (the default of transformers 4.x) passes no gradient to adapters
            # inside a checkpointed block whose input does not require grad (frozen embeddings): the
            # text-encoder adapters would silently never train.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # When any encoder is trained, all of them run inside the wrapped module (prompt encoding needs
    # every encoder); otherwise they stay outside and run under no_grad.
    inside = components.text_encoders if trained_encoders else []
    model = AdaptedDenoiser(unet, inside, components.family)
    optimizer, choice = build_optimizer(param_groups(unet_params, text_params, cfg.optimizer), cfg.optimizer,
                                        accelerator.device)
    # The LR schedule is stepped by us once per optimizer step, so it is not handed to accelerate
    # (whose wrapper steps it once per process).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.scheduler, total_steps)
    model, optimizer, comm = parallel.prepare(accelerator, model, optimizer, count_comm=cfg.logging.comm_stats)
    frozen = [] if trained_encoders else list(components.text_encoders)
    return Setup(components, model, optimizer, lr_scheduler, frozen, weight_dtype, unet_params + text_params, choice,
                 comm)


class StepRunner:
    """Computes the loss of one micro-batch.

    Every random draw of a sample (timestep, VAE posterior sample, noise, noise offset) comes from its own
    generator keyed by (seed, optimizer step, position in the global batch), so runs agree whatever the
    split over ranks and accumulation, and a resumed run needs no generator state.
    """

    def __init__(self, cfg: Config, setup: Setup, accelerator: Accelerator, world: parallel.World,
                 scaling_factor: float = 0.0) -> None:
        self.cfg, self.setup, self.acc, self.world = cfg, setup, accelerator, world
        self.c = setup.components
        self.alphas_cumprod = self.c.noise_scheduler.alphas_cumprod
        self.scaling_factor = scaling_factor

    def global_indices(self, micro_in_step: int, batch_size: int) -> list[int]:
        first = (micro_in_step * self.world.size + self.world.rank) * batch_size
        return list(range(first, first + batch_size))

    @torch.no_grad()
    def _latents(self, batch: Batch, generators: list[torch.Generator]) -> torch.Tensor:
        """A draw from the VAE posterior of each image, scaled; from the cache when the batch carries it."""
        if batch.latent_mean is not None and batch.latent_std is not None:
            mean, std = self._to_device(batch.latent_mean), self._to_device(batch.latent_std)
            scaling = self.scaling_factor
        else:
            vae = self.c.vae
            assert vae is not None and batch.pixels is not None
            pixels = pixels_to_unit_range(self._to_device(batch.pixels), self.acc.device, next(vae.parameters()).dtype)
            dist = vae.encode(pixels).latent_dist
            mean, std, scaling = dist.mean, dist.std, vae.config.scaling_factor
        eps = per_sample_normal(tuple(mean.shape[1:]), generators).to(mean.dtype)
        return ((mean + std * eps) * scaling).to(self.setup.weight_dtype)

    def _noise(self, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        noise = per_sample_noise(tuple(latents.shape[1:]), generators, self.cfg.training.noise_offset)
        return noise.to(latents.dtype)

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Host-to-device copy that does not make the host wait for the GPU: from pinned memory and
        non_blocking (the kernels that read it are queued on the same stream after the copy)."""
        if self.acc.device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.acc.device, dtype, non_blocking=True)

    def loss(self, batch: Any, step: int, micro_in_step: int) -> torch.Tensor:
        generators = sample_generators(self.cfg.training.seed, step,
                                       self.global_indices(micro_in_step, len(batch.keys)), self.acc.device)
        num_t = self.c.noise_scheduler.config.num_train_timesteps
        timesteps = per_sample_timesteps(num_t, generators)
        latents = self._latents(batch, generators)
        noise = self._noise(latents, generators)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        kwargs: dict[str, Any] = {}
        if batch.hidden is not None:
            dtype = self.setup.weight_dtype
            pooled = self._to_device(batch.pooled, dtype) if batch.pooled is not None else None
            kwargs.update(hidden_states=self._to_device(batch.hidden, dtype), pooled=pooled)
        elif self.setup.frozen_text_encoders:
            input_ids = tokenize(self.c.tokenizers, batch.captions)
            with torch.no_grad(), self.acc.autocast():
                hidden, pooled = encode_prompts(self.setup.frozen_text_encoders, input_ids, self.c.family)
            kwargs.update(hidden_states=hidden, pooled=pooled)
        else:
            input_ids = tokenize(self.c.tokenizers, batch.captions)
            kwargs["input_ids"] = [self._to_device(ids) for ids in input_ids]
        if self.c.family == "sdxl":
            rows = [sdxl_time_ids(tuple(m["original_size"]), tuple(m["crop_top_left"]), tuple(m["target_size"]))
                    for m in batch.metas]
            kwargs["time_ids"] = self._to_device(torch.tensor(rows), self.setup.weight_dtype)
        prediction = self.setup.model(noisy, timesteps, **kwargs)
        target = training_target(latents, noise, timesteps, self.alphas_cumprod, self.c.prediction_type)
        # Padding samples weigh 0 and regularization images prior_loss_weight; the mean stays over the
        # whole batch, so a real sample's gradient does not depend on how much padding shares its batch.
        prior = self.cfg.training.prior_loss_weight
        weights = batch.weights.clone()
        for i, meta in enumerate(batch.metas):
            if meta.get("is_reg"):
                weights[i] *= prior
        weights = self._to_device(weights)
        if self.cfg.training.min_snr_gamma > 0:
            weights = weights * min_snr_weights(self.alphas_cumprod, timesteps, self.cfg.training.min_snr_gamma,
                                                 self.c.prediction_type)
        return diffusion_loss(prediction, target, weights)


def _export(cfg: Config, pre: Preflight, setup: Setup, accelerator: Accelerator, steps: int,
            started_at: str) -> None:
    model = parallel.unwrap(accelerator, setup.model)
    c = setup.components
    if cfg.output.format == "diffusers":
        save_diffusers_lora(pre.adapter_path, model.unet, list(c.text_encoders), c.family,
                            SAVE_DTYPES[cfg.output.save_precision])
        return
    tensors = kohya_tensors(model.unet, list(c.text_encoders), c.family)
    training = {
        "ss_sd_model_name": Path(cfg.model.pretrained).name,
        "ss_training_started_at": started_at,
        "ss_steps": str(steps),
        "ss_learning_rate": str(cfg.optimizer.lr),
        "ss_unet_lr": str(cfg.optimizer.lr),
        "ss_text_encoder_lr": str(cfg.optimizer.text_encoder_lr or cfg.optimizer.lr),
        "ss_lr_scheduler": cfg.scheduler.type,
        "ss_optimizer": setup.optimizer_choice.used,
        "ss_mixed_precision": cfg.training.mixed_precision,
        "ss_seed": str(cfg.training.seed),
        "ss_batch_size_per_device": str(cfg.training.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.training.gradient_accumulation_steps),
        "ss_num_train_images": str(pre.manifest.num_samples_with_repeats),
        "ss_noise_offset": str(cfg.training.noise_offset),
        "ss_min_snr_gamma": str(cfg.training.min_snr_gamma),
        "ss_network_dropout": str(cfg.network.dropout),
        "ss_gradient_checkpointing": str(cfg.training.gradient_checkpointing),
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    info = ExportInfo(c.family, c.prediction_type, cfg.output.name, cfg.network.rank, cfg.network.alpha,
                      pre.manifest.resolution, pre.manifest.tag_frequency,
                      {**network_metadata(cfg.network), **training})
    save_kohya_lora(pre.adapter_path, tensors, info, cfg.output.save_precision)


def train(cfg: Config) -> TrainResult:
    pre = preflight(cfg)
    # 'auto' is resolved once, here, and the resolved value is what the run directory's config.toml and
    # the adapter's metadata record.
    cfg = replace(cfg, training=replace(cfg.training,
                                        mixed_precision=device_mixed_precision(cfg.training.mixed_precision)))
    warn_if_plan_exceeds_device(cfg)
    try:
        return _train(cfg, pre)
    except torch.OutOfMemoryError as exc:
        # Anywhere: loading, resume, the loop, export. Checkpoints are written to a staging folder and
        # renamed, so the last complete one is intact.
        raise OutOfMemory(out_of_memory_advice(cfg, parallel.launched_world_size(),
                                               parallel.requested_zero_stage())) from exc


def warn_if_plan_exceeds_device(cfg: Config) -> None:
    """On a GPU, estimate the run's peak memory from the configs (meta device, seconds) and warn early;
    every rank plans the same, so only rank 0 does it."""
    from dist_lora.planning.from_config import device_memory, plan_for_config

    budget = device_memory()
    if budget is None or parallel.launched_rank() != 0:
        return  # one warning per job, from rank 0
    try:
        result = plan_for_config(cfg, gpus=parallel.launched_world_size(), zero_stage=parallel.requested_zero_stage(),
                                 budget=budget)
    except DistLoraError:
        return  # no config folder to plan from (hub id without model.config_dir): nothing to warn about
    if result.plan.device_total > budget:
        changes = "; ".join(a.change for a in result.advice) or "a lower resolution or a larger GPU"
        warnings.warn(f"the memory plan for this run needs about {result.plan.device_total / 2**30:.1f} GiB per GPU "
                      f"but the GPU has {budget / 2**30:.1f} GiB; `dist-lora plan --config ...` shows why. "
                      f"Cheapest changes: {changes}.", stacklevel=2)


def _train(cfg: Config, pre: Preflight) -> TrainResult:
    if torch.cuda.is_available():
        allow_tf32()
    weight_dtype = WEIGHT_DTYPES[cfg.training.mixed_precision]
    # Models load before the accelerator exists: under DeepSpeed ZeRO-3 transformers would otherwise
    # partition every model at load time (zero.Init), frozen encoders included. Only the trained
    # module is handed to DeepSpeed, in prepare().
    components = load_components(cfg.model.pretrained, config_dir=cfg.model.config_dir, family=cfg.model.base,
                                 prediction_type=cfg.model.prediction_type, load_vae=not pre.use_latents,
                                 load_text=not pre.use_text, dtype=weight_dtype,
                                 vae_dtype=torch.float32 if cfg.training.vae_fp32 else weight_dtype)
    accelerator = parallel.make_accelerator(parallel.TrainingShape(
        cfg.training.mixed_precision, cfg.training.gradient_accumulation_steps, cfg.training.batch_size,
        cfg.optimizer.max_grad_norm, cfg.optimizer.type in BITSANDBYTES_OPTIMIZERS,
        cfg.training.gradient_checkpointing))
    w = parallel.world(accelerator)
    set_seed(cfg.training.seed)
    loader = ShardLoader(cfg.data.shards, rank=w.rank, world_size=w.size, batch_size=cfg.training.batch_size,
                         seed=cfg.training.seed, num_workers=cfg.data.num_workers,
                         shuffle_buffer=cfg.data.shuffle_buffer, captions=pre.captions,
                         shard_urls=cfg.data.shard_urls, use_latents=pre.use_latents, use_text=pre.use_text,
                         multiple_of=cfg.training.gradient_accumulation_steps)
    start = find_resume_point(cfg, pre.run_dir, loader)
    run_plan = plan_run(cfg, loader, start)
    total_steps = run_plan.total_steps
    if w.is_main:
        pre.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pre.run_dir / "config.toml", to_toml(cfg))
    parallel.barrier(accelerator)

    setup = build_setup(cfg, components, accelerator, total_steps)
    metrics = MetricsLog(pre.run_dir, enabled=w.is_main, total_steps=total_steps,
                         progress_bar=cfg.logging.progress_bar, wandb_project=cfg.logging.wandb_project,
                         run_config=cfg.to_dict())
    key_log = SampleKeyLog(pre.run_dir, enabled=w.is_main and cfg.logging.record_sample_keys)
    loop = TrainingLoop(cfg, pre.run_dir, setup, StepRunner(cfg, setup, accelerator, w,
                                                                     _scaling_factor(pre)), accelerator, w, loader,
                        run_plan, metrics, key_log)
    started_at = str(int(time.time()))
    marker = pre.run_dir / PREEMPTED_MARKER
    if w.is_main:
        marker.unlink(missing_ok=True)
    try:
        loop.resume(start)
        try:
            loop.run(StopSignals.current())
        except Preempted as stop:
            # Launchers such as torchrun report any non-zero worker status as a plain failure; the
            # marker tells a job script that this run stopped on purpose and can be resumed.
            if w.is_main:
                write_text_atomic(marker, json.dumps({"step": stop.step, "checkpoint": stop.checkpoint,
                                                      "reason": stop.reason, "exit_code": PREEMPTED_EXIT_CODE}))
            parallel.barrier(accelerator)  # no rank exits before the marker is written
            raise
        # From here the run is complete: a stop signal is remembered and ignored, the exit status stays 0.
        parallel.barrier(accelerator)
        signal_hook("export")
        with parallel.master_weights(accelerator, setup.trainable_params):
            if w.is_main:
                _export(cfg, pre, setup, accelerator, loop.state.position.step, started_at)
        parallel.barrier(accelerator)
        signal_hook("after_export")
    finally:
        metrics.close()
        key_log.close()
        loader.close()
    losses = loop.state.losses or [float("nan")]
    step = loop.state.position.step
    first_loss = loop.state.first_loss if loop.state.first_loss is not None else losses[0]
    summary = {"steps": step, "first_loss": first_loss, "last_loss": losses[-1], "adapter": str(pre.adapter_path),
               "skipped_steps": loop.state.skipped_steps, "resumed_from": loop.state.resumed_from,
               "resumes": loop.state.resumes}
    if w.is_main:
        write_text_atomic(pre.run_dir / "summary.json", json.dumps(summary, indent=1))
    return TrainResult(pre.run_dir, pre.adapter_path, pre.run_dir / "config.toml", pre.run_dir / "metrics.jsonl",
                       step, first_loss, losses[-1], losses, parallel.unwrap(accelerator, setup.model))
