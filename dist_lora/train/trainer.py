"""The training loop: preflight checks, model set-up, steps, metrics and export."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from dist_lora import parallel
from dist_lora.adapters.network import check_network_options
from dist_lora.adapters.targets import unet_block_settings
from dist_lora.config import Config, to_toml
from dist_lora.data.augment import Augment, AugmentPolicy
from dist_lora.data.captions import CaptionPolicy, caption_policy, wildcards_only
from dist_lora.data.manifest import CacheInfo, Manifest
from dist_lora.data.shards import ShardLoader, plan_epoch
from dist_lora.errors import DistLoraError
from dist_lora.models.fp8_base import check_base_dtype
from dist_lora.models.load import ModelSource, inspect_model_source, load_components
from dist_lora.models.text import TextEncoding
from dist_lora.sampling.prompts import SamplePrompt, load_prompts
from dist_lora.train.checkpoint import Checkpointer, CheckpointWorld, resolve_resume
from dist_lora.train.checkpoint_format import Storage
from dist_lora.train.checkpoint_parts import register_training_parts
from dist_lora.train.conditioning import Conditioner
from dist_lora.train.data_position import DataPosition, InheritedEntries
from dist_lora.train.export import AdapterExporter, IntermediateSaveHook, step_file
from dist_lora.train.hooks import StepHook
from dist_lora.train.loop import TrainingLoop
from dist_lora.train.loop_hooks import CheckpointHook, MetricsHook, MetricsSources, StopHook
from dist_lora.train.memory import OutOfMemory, out_of_memory_advice
from dist_lora.train.objective import check_objective, training_scheduler
from dist_lora.train.optim import BITSANDBYTES_OPTIMIZERS
from dist_lora.train.optimizer_classes import check_optimizer
from dist_lora.train.optimizer_modes import averaged_weights
from dist_lora.train.precision import WEIGHT_DTYPES, allow_tf32, device_mixed_precision
from dist_lora.train.run_plan import POSITION_PARTS, plan_run, restore_position
from dist_lora.train.sample_hook import SampleHook
from dist_lora.train.setup import build_setup
from dist_lora.train.state import TrainState
from dist_lora.train.step import StepRunner
from dist_lora.train.tracking import MetricsLog, SampleKeyLog
from dist_lora.train.validation import ValidationHook, best_validation
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
    captions: CaptionPolicy
    use_latents: bool  # cached VAE posteriors are read; the VAE is not loaded
    use_text: bool  # cached text-encoder outputs are read; the text encoders are not loaded
    prompts: list[SamplePrompt]  # sample prompts, resolved and checked
    validation: Manifest | None  # the held-out set, if validation is on
    augment: AugmentPolicy  # flip / colour augmentation per sample
    use_masks: bool  # the loss is weighted by each sample's mask


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
    check_objective(cfg.training, cfg.model.prediction_type if cfg.model.prediction_type != "auto"
                    else source.prediction_type)
    family = cfg.model.base if cfg.model.base != "auto" else source.family
    if family is not None:
        unet_block_settings(cfg.network, family)  # the per-block lists' lengths depend on the family
    check_network_options(cfg.network, cfg.output.format, cfg.training.scale_weight_norms)
    check_base_dtype(cfg.model, parallel.requested_zero_stage(), cfg.network.type)
    check_optimizer(cfg.optimizer, parallel.deepspeed_requested())
    if family == "sdxl" and cfg.model.clip_skip != 1:
        raise RunSetupError(f"model.clip_skip = {cfg.model.clip_skip} has no meaning for SDXL, which is conditioned on "
                            f"the penultimate layer of both text encoders (kohya ignores clip_skip for SDXL); set "
                            f"model.clip_skip = 1.")
    d = cfg.data
    captions = caption_policy(d, manifest)
    cache = manifest.cache if d.use_cache else None
    if cache is not None and family is not None and family != cache.family:
        raise RunSetupError(f"data.shards '{manifest.root}' was cached with a {cache.family} model "
                            f"('{cache.model}') but model.pretrained is {family}; cache again with this model "
                            f"or set data.use_cache = false.")
    # Cached text outputs are fixed strings' encodings: caption transforms and a trained text encoder
    # need the encoders at every step, so the cache's text part is then ignored.
    use_text = bool(cache and cache.text) and not captions.active and not cfg.network.train_text_encoder
    if use_text and cache is not None and (cache.clip_skip, cache.max_token_length) != \
            (cfg.model.clip_skip, cfg.model.max_token_length):
        raise RunSetupError(f"data.shards '{manifest.root}' holds text-encoder outputs cached with clip_skip = "
                            f"{cache.clip_skip}, max_token_length = {cache.max_token_length}, but model.clip_skip = "
                            f"{cfg.model.clip_skip}, model.max_token_length = {cfg.model.max_token_length}; cache "
                            f"again with `dist-lora cache --clip-skip {cfg.model.clip_skip} --max-token-length "
                            f"{cfg.model.max_token_length}`, or set data.use_cache = false.")
    # The data plan is checked here, before any model loads (too few shards, bad shard_urls).
    world_size = parallel.launched_world_size()
    manifest.urls(d.shard_urls)
    plan_epoch(manifest, seed=cfg.training.seed, epoch=0, rank=0, world_size=world_size,
               batch_size=cfg.training.batch_size, num_workers=d.num_workers)
    validation = _check_validation(cfg, source.family, bool(cache and cache.latents), use_text, world_size)
    prompts = load_prompts(cfg.sample, manifest.resolution, cfg.training.seed)
    if prompts and cfg.ema.sample and parallel.requested_zero_stage() == 3:
        raise RunSetupError("ema.sample = true renders the samples with the weight average, but this launch uses "
                            "DeepSpeed ZeRO-3, which shards the adapter across ranks; set ema.sample = false (render "
                            "the exported average with `dist-lora sample`, ema.export = true), or launch with DDP "
                            "or ZeRO-2.")
    augment = _augmentation(cfg, manifest, cache)
    return Preflight(source, manifest, run_dir, adapter_path, captions, bool(cache and cache.latents), use_text,
                     prompts, validation, augment, cfg.training.masked_loss and manifest.has_masks)


def _augmentation(cfg: Config, manifest: Manifest, cache: CacheInfo | None) -> AugmentPolicy:
    """data.flip_aug / color_aug, or what each subset of the dataset config set; checked against cached latents."""
    augment = AugmentPolicy.build(Augment(cfg.data.flip_aug, cfg.data.color_aug), manifest.subset_options("augment"))
    if cache is None or not cache.latents:
        return augment
    options = [("data", augment.default), *((f"subset {i} of the dataset config", a)
                                            for i, a in enumerate(augment.subsets))]
    for where, option in options:
        if option.color:
            raise RunSetupError(f"color_aug ({where}) changes the pixels every epoch, but data.shards "
                                f"'{manifest.root}' holds cached latents; set data.use_cache = false to train from the "
                                f"images, or turn color_aug off.")
        if option.flip and not cache.flipped:
            raise RunSetupError(f"flip_aug ({where}) needs the latents of the mirrored images, which data.shards "
                                f"'{manifest.root}' lacks; cache again with `dist-lora cache --flip-aug`, or set "
                                f"data.use_cache = false.")
    return augment


def _check_validation(cfg: Config, family: str | None, use_latents: bool, use_text: bool,
                      world_size: int) -> Manifest | None:
    """The validation set's manifest, checked against how training reads its data."""
    if not cfg.validation.shards:
        return None
    val = Manifest.read(cfg.validation.shards, key="validation.shards")
    family = cfg.model.base if cfg.model.base != "auto" else family
    if val.cache is not None and family is not None and val.cache.family != family:
        raise RunSetupError(f"validation.shards '{val.root}' was cached with a {val.cache.family} model "
                            f"('{val.cache.model}') but model.pretrained is {family}; prepare or cache it for this "
                            f"model.")
    missing = [what for what, needed, held in (("latents", use_latents, val.cache and val.cache.latents),
                                               ("text-encoder outputs", use_text, val.cache and val.cache.text))
               if needed and not held]
    if missing:
        raise RunSetupError(f"training reads cached {' and '.join(missing)} (the encoders are not loaded), but "
                            f"validation.shards '{val.root}' holds none; run `dist-lora cache` on it too, or set "
                            f"data.use_cache = false.")
    plan_epoch(val, seed=cfg.training.seed, epoch=0, rank=0, world_size=world_size,
               batch_size=cfg.validation.batch_size or cfg.training.batch_size, idle_ranks=True)
    return val


def _scaling_factor(pre: Preflight) -> float:
    return pre.manifest.cache.scaling_factor if pre.use_latents and pre.manifest.cache else 0.0


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
    check_objective(cfg.training, components.prediction_type, components.noise_scheduler.config.num_train_timesteps)
    components.noise_scheduler = training_scheduler(components.noise_scheduler, cfg.training)
    components.text_encoding = TextEncoding(cfg.model.clip_skip, cfg.model.max_token_length)
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
                         multiple_of=cfg.training.gradient_accumulation_steps, augment=pre.augment,
                         use_masks=pre.use_masks)
    state = TrainState()
    data_position = DataPosition(loader, state)
    checkpointer = Checkpointer(pre.run_dir, cfg.checkpoint.keep,
                                CheckpointWorld(w.rank, w.size, lambda: parallel.barrier(accelerator)))
    checkpointer.register("train_state", state, Storage.MAIN_JSON)
    checkpointer.register("data_inherited", InheritedEntries(data_position), Storage.MAIN_JSON, optional=True)
    checkpointer.register("data_position", data_position, Storage.RANK_JSON, optional=True)
    resumed = restore_position(checkpointer, resolve_resume(cfg.checkpoint.resume, pre.run_dir), state,
                               data_position, cfg.training.gradient_accumulation_steps)
    run_plan = plan_run(cfg, loader, state, data_position.resume)
    total_steps = run_plan.total_steps
    if w.is_main:
        pre.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pre.run_dir / "config.toml", to_toml(cfg))
    parallel.barrier(accelerator)

    setup = build_setup(cfg, components, accelerator, total_steps)
    metrics = MetricsLog(pre.run_dir, enabled=w.is_main, total_steps=total_steps,
                         progress_bar=cfg.logging.progress_bar, wandb_project=cfg.logging.wandb_project,
                         run_config=cfg.to_dict(), tensorboard=cfg.logging.tensorboard)
    key_log = SampleKeyLog(pre.run_dir, enabled=w.is_main and cfg.logging.record_sample_keys)
    conditioner = Conditioner(setup.components, accelerator.device, setup.weight_dtype, setup.frozen_text_encoders,
                              accelerator.autocast, _scaling_factor(pre), setup.offload)
    exporter = AdapterExporter(cfg, pre.manifest, setup, accelerator, started_at=str(int(time.time())))
    hooks: list[StepHook] = [IntermediateSaveHook(cfg, exporter, pre.run_dir)]
    if pre.validation is not None:
        val_loader = ShardLoader(pre.validation.root, rank=w.rank, world_size=w.size,
                                 batch_size=cfg.validation.batch_size or cfg.training.batch_size,
                                 seed=cfg.training.seed, num_workers=0, shuffle_buffer=0, use_latents=pre.use_latents,
                                 use_text=pre.use_text, idle_ranks=True,
                                 use_masks=cfg.training.masked_loss and pre.validation.has_masks,
                                 captions=wildcards_only(caption_policy(cfg.data, pre.validation)))
        hooks.append(ValidationHook(cfg, val_loader, setup, conditioner, accelerator, metrics))
    hooks.append(SampleHook(cfg, pre.prompts, setup, accelerator, w, pre.run_dir, metrics))
    register_training_parts(checkpointer, accelerator, setup)
    checkpointer.around_save = lambda: averaged_weights(setup.optimizer)
    signals = StopSignals.current()
    sources = MetricsSources(cfg.logging.log_every,
                             cfg.training.batch_size * w.size * cfg.training.gradient_accumulation_steps,
                             loader.stats, lambda: setup.lr_scheduler.get_last_lr()[0], setup.optimizer_choice.used,
                             lambda values: parallel.sum_across_ranks(accelerator, values), setup.comm,
                             tuple(setup.trainable_params))
    # In order: metrics, checkpoints, the other hooks (saves, validation, samples), then the stop check
    # (which stops on a checkpoint just made).
    hooks = [MetricsHook(sources, state, metrics), CheckpointHook(checkpointer, cfg.checkpoint.every_steps), *hooks,
             StopHook(checkpointer, signals, cfg.checkpoint.stop_at_step)]
    loop = TrainingLoop(cfg, setup, StepRunner(cfg, setup, conditioner, w), accelerator, w, loader, run_plan, state,
                        hooks, key_log, signals, resumed_from=str(resumed.folder) if resumed else "")
    marker = pre.run_dir / PREEMPTED_MARKER
    if w.is_main:
        marker.unlink(missing_ok=True)
    try:
        if resumed is not None:
            checkpointer.load(resumed.folder, [name for name in checkpointer.parts if name not in POSITION_PARTS])
        key_log.truncate_from(resumed.micro_step if resumed else 0)
        metrics.truncate_after(state.step)
        if resumed is not None:
            metrics.advance(state.step)
        try:
            loop.run()
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
        exporter.export(pre.adapter_path, state.step, state.epoch + 1)
        signal_hook("after_export")
    finally:
        metrics.close()
        key_log.close()
        loader.close()
    losses = loop.losses or [float("nan")]
    step = state.step
    first_loss = state.first_loss if state.first_loss is not None else losses[0]
    summary = {"steps": step, "first_loss": first_loss, "last_loss": losses[-1], "adapter": str(pre.adapter_path),
               "skipped_steps": state.skipped_steps, "resumed_from": loop.resumed_from,
               "resumes": state.resumes,
               "best_validation": best_validation(pre.run_dir, pre.adapter_path, step,
                                                  lambda s: step_file(pre.run_dir, cfg.output.name, s))}
    if w.is_main:
        write_text_atomic(pre.run_dir / "summary.json", json.dumps(summary, indent=1))
    return TrainResult(pre.run_dir, pre.adapter_path, pre.run_dir / "config.toml", pre.run_dir / "metrics.jsonl",
                       step, first_loss, losses[-1], losses, parallel.unwrap(accelerator, setup.model))
