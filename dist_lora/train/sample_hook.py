"""Sample images during training: a step hook that renders the prompts with the live adapters.

Every rank renders its share of the prompts (prompt i on rank i mod world size); under ZeRO-3, whose
UNet is gathered from all ranks layer by layer as it runs, every rank renders every prompt in step.
The main process gathers the images and writes ``samples/step-XXXXXXXX/NN-<prompt>.png`` (with A1111's "parameters"
text), one labelled ``grid.png`` per round, and the trackers' images. All ranks leave a round together.
A round that fails on any rank (out of memory included) is skipped on every rank alike, reported with
advice, and training continues.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from dist_lora import parallel
from dist_lora.config import Config
from dist_lora.models.load import load_vae_and_text
from dist_lora.sampling.prompts import SamplePrompt
from dist_lora.sampling.render import (
    RenderModules,
    a1111_parameters,
    build_pipeline,
    grid,
    image_name,
    png_bytes,
    render,
)
from dist_lora.train.eval_mode import eval_mode
from dist_lora.train.hooks import HookContext, Moment, Schedule, Scope
from dist_lora.train.offload import maybe_on_device
from dist_lora.train.optimizer_modes import averaged_weights
from dist_lora.train.setup import Setup
from dist_lora.train.tracking import MetricsLog
from dist_lora.utils.files import atomic_path

log = logging.getLogger(__name__)


def round_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "samples" / f"step-{step:08d}"


class SampleHook:
    name = "sample"
    scope = Scope.ALL_RANKS

    def __init__(self, cfg: Config, prompts: list[SamplePrompt], setup: Setup, accelerator: Accelerator,
                 world: parallel.World, run_dir: Path, trackers: MetricsLog) -> None:
        s = cfg.sample
        self.schedule = Schedule(every_steps=s.every_steps, every_epochs=s.every_epochs, at_start=s.at_start,
                                 at_end=s.at_end)
        self.cfg, self.prompts, self.setup, self.acc, self.world = cfg, prompts, setup, accelerator, world
        self.run_dir, self.trackers = run_dir, trackers
        self._last_step = -1

    def run(self, ctx: HookContext) -> None:
        if not self.prompts or ctx.step == self._last_step or ctx.stop_requested:
            return  # nothing to render, this step's round is done (a step that is also the last), or a stop
            # signal is pending: the checkpoint and the stop come first
        if ctx.moment is Moment.START and ctx.step > 0:
            return  # a resumed run: its base-model round was rendered by the run that started it
        self._last_step = ctx.step
        lockstep = parallel.renders_in_lockstep(self.acc)
        mine = self.prompts if lockstep else self.prompts[self.world.rank::self.world.size]
        ema = self.setup.ema
        with ema.swapped_in() if ema is not None and self.cfg.ema.sample else contextlib.nullcontext():
            rendered, failure = self._render(mine)
        if parallel.any_rank(bool(failure)):
            if failure:
                log.warning("rank %d: sample round at step %d failed: %s", self.world.rank, ctx.step, failure)
            if self.world.is_main:
                log.warning("sample round at step %d skipped on every rank; training continues", ctx.step)
            return
        # In lockstep every rank rendered every image: the main rank's are the whole set.
        parts = [rendered] if lockstep else parallel.gather_to_all(rendered)
        if self.world.is_main:
            self._write(ctx.step, sorted(item for part in parts for item in part))
        parallel.barrier(self.acc)

    def _modules(self) -> RenderModules:
        c, setup = self.setup.components, self.setup
        unet = parallel.unwrap(self.acc, setup.model).unet  # type: ignore[union-attr]
        vae, tokenizers, encoders = c.vae, c.tokenizers, c.text_encoders
        if vae is None or not encoders:  # training reads cached latents / text: load them for this round
            loaded_vae, loaded_tokenizers, loaded_encoders = load_vae_and_text(
                self.cfg.model.pretrained, config_dir=self.cfg.model.config_dir, family=c.family,
                dtype=setup.weight_dtype)
            device = self.acc.device
            vae = vae if vae is not None else loaded_vae.requires_grad_(False).to(device)
            if not encoders:
                tokenizers = loaded_tokenizers
                encoders = [e.requires_grad_(False).to(device) for e in loaded_encoders]
        return RenderModules(c.family, unet, vae, list(encoders), list(tokenizers), c.noise_scheduler.config,
                             self.acc.autocast, c.text_encoding)

    def _render(self, mine: list[SamplePrompt]) -> tuple[list[tuple[int, bytes]], str]:
        """This rank's images as (prompt number, PNG bytes), or the reason the round failed here."""
        try:
            modules = self._modules()
            try:
                with averaged_weights(self.setup.optimizer), \
                        eval_mode([modules.unet, modules.vae, *modules.text_encoders]), \
                        maybe_on_device(self.setup.offload, modules.vae, *modules.text_encoders):
                    pipeline = build_pipeline(modules)
                    pipeline.set_progress_bar_config(disable=True)
                    return [(p.number, png_bytes(render(pipeline, modules, p),
                                                 a1111_parameters(p, self.cfg.output.name))) for p in mine], ""
            finally:
                del modules
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        except torch.OutOfMemoryError:
            return [], ("out of memory; render fewer or smaller samples (sample.width / sample.height, --w / --h), "
                        "or sample less often")
        except Exception as exc:  # noqa: BLE001 - a failed round is reported and skipped, training goes on
            log.exception("sample round failed")
            return [], f"{type(exc).__name__}: {exc}"

    def _write(self, step: int, rendered: list[tuple[int, bytes]]) -> None:
        folder = round_folder(self.run_dir, step)
        by_number = {p.number: p for p in self.prompts}
        images, labels = [], []
        for number, data in rendered:
            with atomic_path(folder / image_name(by_number[number])) as tmp:
                tmp.write_bytes(data)
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            labels.append(f"{number:02d} {by_number[number].prompt}")
        sheet = grid(images, labels, title=f"{self.cfg.output.name} step {step}")
        with atomic_path(folder / "grid.png") as tmp:
            sheet.save(tmp, format="PNG")
        self.trackers.log_images(step, [(f"{n:02d}", image) for (n, _), image in zip(rendered, images, strict=True)]
                                 + [("grid", sheet)])
