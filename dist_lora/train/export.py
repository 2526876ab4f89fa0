"""Writing the adapter file: at the end of a run, and every N steps or epochs during it.

Intermediate files are named as kohya names them (``<name>-000003.safetensors`` after epoch 3,
``<name>-step00000100.safetensors`` at step 100), carry ``ss_steps`` / ``ss_epoch`` in their metadata,
are written atomically, and ``output.save_last_n`` keeps the newest N of each kind.
"""

from __future__ import annotations

import contextlib
import re
from datetime import datetime, timezone
from pathlib import Path

from accelerate import Accelerator

from dist_lora import parallel
from dist_lora.adapters.diffusers_format import save_diffusers_lora
from dist_lora.adapters.kohya import SAVE_DTYPES, ExportInfo, kohya_tensors, save_kohya_lora
from dist_lora.adapters.network import network_metadata
from dist_lora.config import Config, TrainingConfig
from dist_lora.data.manifest import Manifest
from dist_lora.train.hooks import HookContext, Schedule, Scope
from dist_lora.train.optimizer_modes import averaged_weights
from dist_lora.train.setup import Setup


class AdapterExporter:
    def __init__(self, cfg: Config, manifest: Manifest, setup: Setup, accelerator: Accelerator,
                 started_at: str) -> None:
        self.cfg, self.manifest, self.setup, self.acc, self.started_at = cfg, manifest, setup, accelerator, started_at

    def export(self, path: Path, steps: int, epoch: int) -> None:
        """Collective: every rank calls it; the main rank writes the trained (fp32 master) weights."""
        ema = self.setup.ema if self.cfg.ema.export else None
        with averaged_weights(self.setup.optimizer), parallel.master_weights(self.acc, self.setup.trainable_params), \
                ema.swapped_in() if ema is not None else contextlib.nullcontext():
            if self.acc.is_main_process:
                self._write(path, steps, epoch)
        parallel.barrier(self.acc)

    def _write(self, path: Path, steps: int, epoch: int) -> None:
        cfg, setup = self.cfg, self.setup
        model = parallel.unwrap(self.acc, setup.model)
        c = setup.components
        if cfg.output.format == "diffusers":
            save_diffusers_lora(path, model.unet, list(c.text_encoders), c.family,  # type: ignore[arg-type]
                                SAVE_DTYPES[cfg.output.save_precision])
            return
        tensors = kohya_tensors(model.unet, list(c.text_encoders), c.family)  # type: ignore[arg-type]
        training = {
            "ss_sd_model_name": Path(cfg.model.pretrained).name,
            "ss_training_started_at": self.started_at,
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
            "ss_learning_rate": str(cfg.optimizer.lr),
            "ss_unet_lr": str(cfg.optimizer.lr),
            "ss_text_encoder_lr": str(cfg.optimizer.text_encoder_lr or cfg.optimizer.lr),
            "ss_lr_scheduler": cfg.scheduler.type,
            "ss_optimizer": setup.optimizer_choice.used,
            "ss_mixed_precision": cfg.training.mixed_precision,
            "ss_seed": str(cfg.training.seed),
            "ss_batch_size_per_device": str(cfg.training.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.training.gradient_accumulation_steps),
            "ss_num_train_images": str(self.manifest.num_samples_with_repeats),
            "ss_noise_offset": str(cfg.training.noise_offset),
            "ss_min_snr_gamma": str(cfg.training.min_snr_gamma),
            **objective_metadata(cfg.training),
            "ss_network_dropout": str(cfg.network.dropout),
            "ss_clip_skip": str(cfg.model.clip_skip),
            "ss_max_token_length": str(cfg.model.max_token_length),
            "ss_gradient_checkpointing": str(cfg.training.gradient_checkpointing),
            "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        info = ExportInfo(c.family, c.prediction_type, cfg.output.name, cfg.network.rank, cfg.network.alpha,
                          self.manifest.resolution, self.manifest.tag_frequency,
                          {**network_metadata(cfg.network, cfg.output.format), **training})
        save_kohya_lora(path, tensors, info, cfg.output.save_precision)


def objective_metadata(t: TrainingConfig) -> dict[str, str]:
    """The noise and loss options under kohya's metadata names (Python's str of each value, as kohya), and
    a narrowed timestep range as modelspec's."""
    values = {"noise_offset_random_strength": t.noise_offset_random_strength,
              "adaptive_noise_scale": t.adaptive_noise_scale,
              "multires_noise_iterations": t.multires_noise_iterations,
              "multires_noise_discount": t.multires_noise_discount, "ip_noise_gamma": t.ip_noise_gamma,
              "ip_noise_gamma_random_strength": t.ip_noise_gamma_random_strength,
              "zero_terminal_snr": t.zero_terminal_snr, "debiased_estimation": t.debiased_estimation,
              "loss_type": t.loss_type, "huber_schedule": t.huber_schedule, "huber_c": t.huber_c,
              "huber_scale": t.huber_scale, "scale_weight_norms": t.scale_weight_norms or None}
    meta = {f"ss_{key}": str(value) for key, value in values.items()}
    if (t.min_timestep, t.max_timestep) != (0, 1000):
        meta["modelspec.timestep_range"] = f"{t.min_timestep},{t.max_timestep}"  # as kohya's sai_model_spec
    return meta


def step_file(run_dir: Path, name: str, step: int) -> Path:
    return run_dir / f"{name}-step{step:08d}.safetensors"


def epoch_file(run_dir: Path, name: str, epoch: int) -> Path:
    return run_dir / f"{name}-{epoch:06d}.safetensors"


class IntermediateSaveHook:
    """Adapter files every ``output.save_every_steps`` steps and after every ``output.save_every_epochs``
    epochs, except at the last step (the run's own file is written then)."""

    name = "save"
    scope = Scope.ALL_RANKS  # the export gathers weights under DeepSpeed

    def __init__(self, cfg: Config, exporter: AdapterExporter, run_dir: Path) -> None:
        out = cfg.output
        self.schedule = Schedule(every_steps=out.save_every_steps, every_epochs=out.save_every_epochs)
        self.cfg, self.exporter, self.run_dir = cfg, exporter, run_dir

    def run(self, ctx: HookContext) -> None:
        if ctx.step >= ctx.total_steps:
            return
        out = self.cfg.output
        epoch_due = ctx.epoch_finished and out.save_every_epochs > 0 and (ctx.epoch + 1) % out.save_every_epochs == 0
        if epoch_due:
            self.exporter.export(epoch_file(self.run_dir, out.name, ctx.epoch + 1), ctx.step, ctx.epoch + 1)
        if out.save_every_steps > 0 and ctx.step % out.save_every_steps == 0:
            self.exporter.export(step_file(self.run_dir, out.name, ctx.step), ctx.step, ctx.epoch + 1)
        if out.save_last_n and self.exporter.acc.is_main_process:
            prune(self.run_dir, out.name, out.save_last_n)


def prune(run_dir: Path, name: str, keep: int) -> None:
    """Keep the newest ``keep`` per-step files and the newest ``keep`` per-epoch files."""
    for pattern in (rf"{re.escape(name)}-step(\d{{8}})\.safetensors", rf"{re.escape(name)}-(\d{{6}})\.safetensors"):
        found = sorted((int(m[1]), p) for p in run_dir.glob(f"{name}-*.safetensors")
                       if (m := re.fullmatch(pattern, p.name)))
        for _, path in found[:-keep]:
            path.unlink()
