"""`dist-lora sample`: an X/Y grid over adapter files x weights (x CFG scales) with fixed seeds, to pick
the best checkpoint and weight; what A1111's X/Y/Z plot does by hand.

Every cell starts from the base model's weights with one file merged at one weight (as the UIs apply
an adapter; DoRA is interpolated as they do). Under `accelerate launch` the (file, weight) cells are
split across the processes and the main process writes the images and grids.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dist_lora.adapters.io import AdapterFileError, read_adapter_file
from dist_lora.adapters.merge import merge_files
from dist_lora.config import SampleConfig
from dist_lora.errors import DistLoraError
from dist_lora.models.load import inspect_model_source, load_pipeline, pipeline_text_encoders
from dist_lora.models.text import MAX_TOKEN_LENGTHS, TextEncoding
from dist_lora.sampling.prompts import SamplePrompt, load_prompts
from dist_lora.sampling.render import RenderModules, a1111_parameters, build_pipeline, grid, png_bytes, render
from dist_lora.train.tracking import read_validation_log
from dist_lora.utils.files import atomic_path, check_writable_dir

_STEP_NAME = re.compile(r"-step(\d{8})$")
_EPOCH_NAME = re.compile(r"-(\d{6})$")


@dataclass(frozen=True)
class AdapterEntry:
    path: Path
    family: str | None  # the base model family the file says it was trained for
    step: int | None  # the training step it was written at, when known
    val_loss: float | None  # the run's validation loss at that step, when the run has one


def _step_of(path: Path, metadata: dict[str, str]) -> int | None:
    match = _STEP_NAME.search(path.stem)
    if match:
        return int(match[1])
    steps = metadata.get("ss_steps")
    return int(steps) if steps and steps.isdigit() else None


def adapter_entries(specs: list[str]) -> list[AdapterEntry]:
    """Files as given; a run folder stands for its adapter files (intermediate and final), by step."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
            if not found:
                raise AdapterFileError(f"'{path}' holds no adapter files (*.safetensors).")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise AdapterFileError(f"adapter '{path}' does not exist (give .safetensors files or a run folder).")
    entries = []
    losses: dict[Path, dict[int, float]] = {}  # per run folder
    for path in paths:
        adapter = read_adapter_file(path)  # raises AdapterFileError naming the file if it is not an adapter
        step = _step_of(path, adapter.metadata)
        folder_losses = losses.setdefault(path.parent, dict(read_validation_log(path.parent)))
        entries.append(AdapterEntry(path, adapter.base_family, step,
                                    folder_losses.get(step) if step is not None else None))
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.path.name))


def parse_numbers(spec: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError as exc:
        raise DistLoraError(f"--{what} '{spec}': expected comma-separated numbers, e.g. 0.4,0.8,1.2") from exc
    if not values:
        raise DistLoraError(f"--{what} '{spec}': give at least one number.")
    return values


@dataclass(frozen=True)
class GridJob:
    base: str
    config_dir: str
    entries: list[AdapterEntry]
    weights: list[float]
    cfg_scales: list[float]
    prompts: list[SamplePrompt]
    family: str
    out: Path


def plan_grid(base: str, adapters: list[str], out: str, *, weights: str = "1", cfg_scales: str = "",
              sample: SampleConfig, config_dir: str = "") -> GridJob:
    """Every input checked, nothing loaded yet."""
    source = inspect_model_source(base, config_dir)
    entries = adapter_entries(adapters)
    for entry in entries:
        if source.family and entry.family and entry.family != source.family:
            raise AdapterFileError(f"adapter file '{entry.path}' was trained for {entry.family}; '{base}' is "
                                   f"{source.family}.")
    family = source.family or "sd1"
    prompts = load_prompts(sample, 1024 if family == "sdxl" else 512, 0)
    if not prompts:
        raise DistLoraError("no prompts: give --prompt TEXT (kohya's line format) or --prompt-file FILE.")
    check_writable_dir(Path(out))
    return GridJob(base, config_dir, entries, parse_numbers(weights, "weights"),
                   parse_numbers(cfg_scales, "cfg") if cfg_scales else [], prompts, family, Path(out))


def _cells(job: GridJob) -> list[tuple[int, float]]:
    return [(i, w) for i in range(len(job.entries)) for w in job.weights]


def _with_cfg(prompt: SamplePrompt, cfg: float) -> SamplePrompt:
    return SamplePrompt(prompt.number, prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height,
                        prompt.seed, cfg, prompt.steps, prompt.sampler, prompt.origin)


def trained_text_encoding(path: Path, family: str) -> TextEncoding:
    """The clip skip and token length an adapter was trained with (kohya's ss_clip_skip /
    ss_max_token_length); the pipelines' own where the file does not say."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    clip_skip, length = metadata.get("ss_clip_skip", ""), metadata.get("ss_max_token_length", "")
    return TextEncoding(int(clip_skip) if clip_skip.isdigit() and family != "sdxl" else 1,
                        int(length) if length.isdigit() and int(length) in MAX_TOKEN_LENGTHS else 75)


def render_grid(job: GridJob) -> list[Path]:
    """Render this process's cells; the main process writes every image and one grid per prompt."""
    from accelerate import PartialState

    state = PartialState()
    device = state.device
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    pipe, family = load_pipeline(job.base, job.config_dir)
    pipe.to(device, dtype)
    pipe.vae.to(torch.float32)
    encoders = pipeline_text_encoders(pipe, family)
    modules = [pipe.unet, *encoders]
    # The base weights, kept in host memory: every cell starts from them.
    base_state = [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in modules]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    rendered: list[tuple[int, float, int, float, bytes]] = []
    encodings = {index: trained_text_encoding(entry.path, family) for index, entry in enumerate(job.entries)}
    for index, weight in _cells(job)[state.process_index::state.num_processes]:
        for module, saved in zip(modules, base_state, strict=True):
            module.load_state_dict(saved)
        merge_files(pipe.unet, encoders, family, [(job.entries[index].path, weight)])
        render_modules = RenderModules(family, pipe.unet, pipe.vae, encoders, tokenizers, pipe.scheduler.config,
                                       autocast, encodings[index])
        pipeline = build_pipeline(render_modules)
        pipeline.set_progress_bar_config(disable=True)
        for prompt in job.prompts:
            for cfg in job.cfg_scales or [prompt.cfg_scale]:
                cell = _with_cfg(prompt, cfg)
                image = render(pipeline, render_modules, cell)
                text = a1111_parameters(cell, job.entries[index].path.stem, weight)
                rendered.append((index, weight, prompt.number, cfg, png_bytes(image, text)))
    from accelerate.utils import gather_object

    everything = list(gather_object(rendered)) if state.num_processes > 1 else rendered
    written: list[Path] = []
    if state.is_main_process:
        written = _write(job, everything)
    state.wait_for_everyone()
    return written


def _cell_name(entry: AdapterEntry, weight: float, cfg: float) -> str:
    return f"{entry.path.stem}-w{weight:g}-cfg{cfg:g}.png"


def _write(job: GridJob, rendered: list[tuple[int, float, int, float, bytes]]) -> list[Path]:
    by_key = {(i, w, n, c): data for i, w, n, c, data in rendered}
    written = []
    for prompt in job.prompts:
        folder = job.out / f"{prompt.number:02d}"
        cfgs = job.cfg_scales or [prompt.cfg_scale]
        images, labels = [], []
        for index, entry in enumerate(job.entries):
            loss = f" val {entry.val_loss:.4f}" if entry.val_loss is not None else ""
            for weight in job.weights:
                for cfg in cfgs:
                    data = by_key[(index, weight, prompt.number, cfg)]
                    with atomic_path(folder / _cell_name(entry, weight, cfg)) as tmp:
                        tmp.write_bytes(data)
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    labels.append(f"{entry.path.stem}{loss} w{weight:g} cfg{cfg:g}")
        sheet = grid(images, labels, columns=len(job.weights) * len(cfgs),
                     title=f"{prompt.number:02d} {prompt.prompt} (rows: files; columns: weight x CFG)")
        path = job.out / f"grid-{prompt.number:02d}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(path)
    return written


def describe(job: GridJob) -> str:
    lines = [f"{len(job.entries)} file(s) x {len(job.weights)} weight(s) x {len(job.cfg_scales) or 1} CFG scale(s) "
             f"x {len(job.prompts)} prompt(s)"]
    for entry in job.entries:
        step = f"step {entry.step}" if entry.step is not None else "step ?"
        loss = f"  val_loss {entry.val_loss:.5f}" if entry.val_loss is not None else ""
        lines.append(f"  {entry.path.name}  {step}{loss}")
    return "\n".join(lines)
