"""`dist-lora`: thin command line over the library (parse, call, report)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_lora.adapter_cli import add_adapter_tool_commands
from dist_lora.caption_cli import (
    add_audit_command,
    add_audit_options,
    add_caption_editor_command,
    add_captioning_commands,
)
from dist_lora.errors import DistLoraError

_USER_ERRORS = (DistLoraError, FileExistsError, PermissionError, NotADirectoryError, FileNotFoundError)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dist_lora.demo import run_demo

    run_demo(args.out, steps=args.steps, arch=args.arch)
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from dist_lora.models.tiny import write_tiny_pipeline

    out = write_tiny_pipeline(args.arch, args.out, seed=args.seed)
    if args.single_file:
        from diffusers import DiffusionPipeline

        from dist_lora.models.single_file import save_single_file

        save_single_file(DiffusionPipeline.from_pretrained(out), args.single_file)
        print(f"wrote single-file checkpoint {args.single_file}")
    print(f"wrote tiny {args.arch} pipeline to {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dist_lora.data.prepare import PrepareOptions, prepare_dataset

    opts = PrepareOptions(resolution=args.resolution, trigger=args.trigger, shard_size=args.shard_size,
                          image_format=args.image_format, overwrite=args.overwrite, buckets=not args.no_buckets,
                          min_bucket_side=args.min_bucket_side, max_bucket_side=args.max_bucket_side,
                          max_bucket_area=args.max_bucket_area, bucket_step=args.bucket_step,
                          min_side=args.min_side, max_pixels=args.max_pixels, reg_src=args.reg,
                          workers=args.workers, val_fraction=args.val_fraction, no_upscale=args.bucket_no_upscale,
                          random_crop=args.random_crop, alpha_mask=args.alpha_mask, mask_dir=args.mask_dir,
                          caption_extension=args.caption_extension, wildcard=args.enable_wildcard,
                          audit_distance=args.audit_distance, tokenizer=args.tokenizer,
                          max_token_length=args.max_token_length)
    dataset = None
    if args.dataset_config:
        from dist_lora.data.dataset_config import read_dataset_config

        if args.src is not None or args.metadata_file:
            raise DistLoraError(f"give a dataset folder ('{args.src}'), --metadata-file or --dataset-config "
                                f"'{args.dataset_config}', not several: the config's subsets name their files.")
        dataset = read_dataset_config(args.dataset_config)
    elif args.metadata_file:
        from dist_lora.data.dataset_config import metadata_dataset

        for flag, value in (("--reg", args.reg), ("--mask-dir", args.mask_dir)):
            if value:
                raise DistLoraError(f"{flag} '{value}' and --metadata-file: a fine-tuning dataset has no "
                                    f"{'regularization images' if flag == '--reg' else 'mask folder'} in sd-scripts; "
                                    f"use a dataset config (--dataset-config) with an image-folder subset.")
        dataset = metadata_dataset(args.metadata_file, args.src, args.repeats)  # SRC: the images' folder
    shards = None
    if args.webdataset:
        from dist_lora.data.webdataset_source import WebDatasetSource

        shards = WebDatasetSource.open(args.webdataset, args.caption_key)
    elif args.caption_key:
        raise DistLoraError(f"--caption-key '{args.caption_key}' names a key of WebDataset samples' .json; it "
                            f"needs --webdataset.")
    from dist_lora.parallel import launched_rank, shutdown

    try:
        report = prepare_dataset(None if dataset is not None else args.src, args.out, opts, dataset, shards)
    finally:
        shutdown()
    if launched_rank() != 0:
        return 0
    print(report.summary())
    for key, value in (dataset.training.items() if dataset is not None else ()):
        print(f"note: the dataset config sets {key} = {value!r}, a training setting: set training.{key} = "
              f"{value!r} in the training config")
    print(f"shards, manifest.json and report.json in {args.out}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from dist_lora.data.cache import CacheOptions, cache_dataset

    opts = CacheOptions(model=args.model, config_dir=args.config_dir, text=not args.no_text, dtype=args.dtype,
                        batch_size=args.batch_size, overwrite=args.overwrite, clip_skip=args.clip_skip,
                        max_token_length=args.max_token_length, flip_aug=args.flip_aug)
    import torch

    from dist_lora.parallel import launched_rank, shutdown
    from dist_lora.train.memory import OutOfMemory, cache_out_of_memory_advice

    try:
        report = cache_dataset(args.src, args.out, opts)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(cache_out_of_memory_advice(args.batch_size)) from exc
    finally:
        shutdown()
    print(f"rank {launched_rank()}: cached {report.samples} samples in {report.shards_done} shards "
          f"({report.shards_resumed} already done), {len(report.bad)} bad samples left out")
    for bad in report.bad:
        print(f"  bad sample {bad['shard']}/{bad['key']}: {bad['reason']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dist_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    from dist_lora.parallel import launched_rank, shutdown
    from dist_lora.train.trainer import train

    try:
        result = train(cfg)
    finally:
        shutdown()
    if launched_rank() == 0:
        print(f"adapter: {result.adapter_path}\nconfig: {result.config_path}\nmetrics: {result.metrics_path}\n"
              f"loss: {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} steps")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from dist_lora.config import load_config
    from dist_lora.planning.estimate import format_plan
    from dist_lora.planning.from_config import device_memory, parse_memory, plan_for_config

    cfg = load_config(args.config, args.overrides)
    budget = parse_memory(args.gpu_memory) if args.gpu_memory else device_memory()
    result = plan_for_config(cfg, gpus=args.gpus, zero_stage=args.zero_stage, budget=budget,
                             resolution=args.resolution)
    if args.json:
        print(json.dumps({"settings": asdict(result.plan.settings), "image_size": result.sizes.image_size,
                          "components": {c.name: c.bytes for c in result.plan.components},
                          "allocated": result.plan.allocated, "device_total": result.plan.device_total,
                          "budget": budget, "fits": None if budget is None else result.plan.device_total <= budget,
                          "suggestions": [{"change": a.change, "device_total": a.device_total}
                                          for a in result.advice]}, indent=1))
    else:
        height, width = result.sizes.image_size
        print(f"{result.sizes.family} at {width}x{height}, {result.sizes.unet_adapter_params / 1e6:.1f}M UNet adapter "
              f"parameters")
        print(format_plan(result.plan, budget, result.advice))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from dist_lora.adapters.inspect import describe_adapter, format_description

    info = describe_adapter(args.file)
    print(json.dumps(info, indent=1, ensure_ascii=False) if args.json else format_description(info))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from dist_lora.merge_cli import merge_command

    out = merge_command(args.base, args.lora, args.out, config_dir=args.config_dir,
                        save_precision=args.save_precision, overwrite=args.overwrite)
    print(f"wrote merged model to {out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from dist_lora.config import SampleConfig
    from dist_lora.parallel import launched_rank
    from dist_lora.sampling.grid_cli import describe, plan_grid, render_grid

    defaults = SampleConfig(prompts=list(args.prompt), prompt_file=args.prompt_file, negative_prompt=args.negative,
                            width=args.width, height=args.height, steps=args.steps, sampler=args.sampler,
                            seed=args.seed)
    job = plan_grid(args.base, args.adapters, args.out, weights=args.weights, cfg_scales=args.cfg, sample=defaults,
                    config_dir=args.config_dir)
    if launched_rank() == 0:
        print(describe(job))
    for path in render_grid(job):
        print(f"wrote {path}")
    return 0


def _cmd_import_kohya(args: argparse.Namespace) -> int:
    from dist_lora.importers.kohya_import import import_kohya_config, write_import

    supplied = {key: value for key, value in (("train_data_dir", args.train_data_dir),
                                              ("reg_data_dir", args.reg_data_dir),
                                              ("pretrained_model_name_or_path", args.pretrained),
                                              ("output_dir", args.output_dir)) if value}
    result = import_kohya_config(args.config, args.out, args.dataset_config or None, supplied)
    written = write_import(result, args.out, Path(args.config))
    report = result.report
    print(f"{len(report.mapped)} keys mapped, {len(report.no_effect)} without effect here, {len(report.unsupported)} "
          f"unsupported (see {written[2]})")
    for key, value, why in report.unsupported:
        print(f"  unsupported: {key} = {value!r}: {why}")
    for line in result.missing_lines():
        print(f"  {line}")
    print(f"recipe: {written[0]}\ndata and training commands: bash {written[1]}")
    return 0


def _cmd_config_reference(_: argparse.Namespace) -> int:
    from dist_lora.config import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-lora", description="Distributed LoRA training for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="end-to-end run on a tiny SDXL pipeline (CPU, ~2 minutes)")
    demo.add_argument("--out", default="demo_output", help="working folder owned by the demo")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    demo.set_defaults(func=_cmd_demo)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight diffusers pipeline")
    tiny.add_argument("out")
    tiny.add_argument("--arch", choices=["sd15", "sdxl"], default="sdxl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--single-file", default="", help="also write it as one LDM-style .safetensors file")
    tiny.set_defaults(func=_cmd_tiny_model)

    prep = sub.add_parser("prepare", help="kohya folder (<repeats>_<name>/img.png + img.txt), the subsets of an "
                          "sd-scripts dataset config, or existing WebDataset shards -> bucketed WebDataset shards; "
                          "under accelerate launch or srun, every process prepares a slice")
    prep.add_argument("src", nargs="?", help="kohya training folder (omit with --dataset-config or --webdataset; "
                      "with --metadata-file, the images' folder)")
    prep.add_argument("out")
    prep.add_argument("--dataset-config", default="",
                      help="sd-scripts dataset config ([general], [[datasets]], [[datasets.subsets]]): its subsets "
                           "into one manifest, with their repeats, captions and per-subset caption options; its "
                           "bucket settings replace the options below")
    prep.add_argument("--metadata-file", default="",
                      help="sd-scripts' fine-tuning metadata (.json or .jsonl; sd-scripts: in_json): the images it "
                           "lists, with its captions and tags; SRC, if given, is the folder its relative keys are "
                           "in (sd-scripts: train_data_dir)")
    prep.add_argument("--webdataset", default="", metavar="URLS",
                      help="existing WebDataset / img2dataset shards as the source, read as they stream: braces "
                           "('shards/{00000..00127}.tar'), '::'-separated lists and 'pipe:' commands (omit SRC); "
                           "under accelerate launch or srun each process reads every n-th shard")
    prep.add_argument("--caption-key", default="",
                      help="with --webdataset: take each sample's caption from this key of its .json member "
                           "(dotted for nested keys, e.g. 'caption' or 'meta.prompt') instead of its .txt member")
    prep.add_argument("--repeats", type=int, default=1,
                      help="repeats of each --metadata-file image (sd-scripts: dataset_repeats)")
    prep.add_argument("--resolution", type=int, default=512,
                      help="bucket base side: 512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL")
    prep.add_argument("--trigger", default="", help="trigger word put first in every caption")
    prep.add_argument("--reg", default="", help="regularization folder (<repeats>_<class>/...) for prior preservation")
    prep.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most")
    prep.add_argument("--image-format", choices=["png", "jpg"], default="png")
    prep.add_argument("--no-buckets", action="store_true", help="square resolution x resolution crops only")
    prep.add_argument("--min-bucket-side", type=int, default=0, help="0: resolution / 2")
    prep.add_argument("--max-bucket-side", type=int, default=0, help="0: resolution * 2")
    prep.add_argument("--max-bucket-area", type=int, default=0, help="pixels; 0: resolution^2")
    prep.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    prep.add_argument("--min-side", type=int, default=0, help="reject images whose shorter side is below this; "
                      "0: resolution / 4")
    prep.add_argument("--max-pixels", type=int, default=178_956_970, help="reject larger images (decompression bombs)")
    prep.add_argument("--workers", type=int, default=0, help="decode processes; 0: one per core")
    prep.add_argument("--val-fraction", type=float, default=0.0,
                      help="hold out this fraction of the images (by a hash of their path) as a validation set in "
                           "OUT/val, for validation.shards")
    prep.add_argument("--bucket-no-upscale", action="store_true",
                      help="kohya's bucket_no_upscale (with buckets; sd-scripts ignores it without): an image "
                           "within the bucket area keeps its size (its bucket is its size rounded down to "
                           "--bucket-step); larger ones are scaled down to the area")
    prep.add_argument("--random-crop", action="store_true",
                      help="store images scaled but uncropped; training crops each at a random offset every epoch "
                           "(recorded for SDXL's crop conditioning). Such samples cannot be cached")
    prep.add_argument("--alpha-mask", action="store_true",
                      help="keep each image's transparency as its loss mask (kohya's alpha_mask) instead of "
                           "compositing it on white")
    prep.add_argument("--mask-dir", default="",
                      help="folder of mask images (their red channel weights the loss, kohya's masked_loss) laid out "
                           "as the source folder: MASKS/20_robot/a.png for SRC/20_robot/a.jpg")
    prep.add_argument("--caption-extension", default=".caption",
                      help="caption files of a dataset config's subsets that set no caption_extension (sd-scripts' "
                           "default); a kohya folder's captions are always .txt or .caption")
    prep.add_argument("--enable-wildcard", action="store_true",
                      help="kohya's enable_wildcard: captions keep every line; training picks one line and one "
                           "option of each {a|b|c} per sample and epoch (a dataset config's subsets may set it)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty output folder (a previous prepare output is updated in place)")
    add_audit_options(prep)
    prep.set_defaults(func=_cmd_prepare)

    cache = sub.add_parser("cache", help="add VAE latents (and text-encoder outputs) to prepared shards; run under "
                           "`accelerate launch` to encode on every GPU")
    cache.add_argument("src", help="output folder of `dist-lora prepare`")
    cache.add_argument("out", help="new folder for the cached shards")
    cache.add_argument("--model", required=True, help="the model you will train: diffusers folder, hub id or "
                       ".safetensors")
    cache.add_argument("--config-dir", default="", help="diffusers folder with configs for a single-file model")
    cache.add_argument("--no-text", action="store_true", help="cache latents only (needed for caption shuffling "
                       "or text-encoder training, which encode captions at every step anyway)")
    cache.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    cache.add_argument("--batch-size", type=int, default=8)
    cache.add_argument("--clip-skip", type=int, default=1, help="encode captions as model.clip_skip will (SD 1.x/2.x)")
    cache.add_argument("--max-token-length", type=int, choices=[75, 150, 225], default=75,
                       help="encode captions as model.max_token_length will")
    cache.add_argument("--flip-aug", action="store_true",
                       help="also cache the latents of the mirrored images, for data.flip_aug (on anyway for a "
                            "dataset config's subsets with flip_aug)")
    cache.add_argument("--overwrite", action="store_true")
    cache.set_defaults(func=_cmd_cache)

    tr = sub.add_parser("train", help="train an adapter (run under `accelerate launch` for several processes)")
    tr.add_argument("--config", default=None, help="TOML recipe, e.g. configs/tiny_sdxl.toml")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=100")
    tr.set_defaults(func=_cmd_train)

    plan = sub.add_parser("plan", help="estimate peak GPU memory per component from the config alone, and what "
                          "to change when it does not fit")
    plan.add_argument("--config", default=None, help="TOML recipe")
    plan.add_argument("overrides", nargs="*", help="section.key=value overrides")
    plan.add_argument("--gpu-memory", default="", help="memory per GPU, e.g. 24GiB (default: this machine's GPU)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the run is spread over")
    plan.add_argument("--zero-stage", type=int, choices=[0, 2, 3], default=0,
                      help="DeepSpeed ZeRO stage of the launch (0: DDP)")
    plan.add_argument("--resolution", type=int, default=0,
                      help="plan for resolution^2 images (default: the largest bucket of data.shards, else 512/1024)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    insp = sub.add_parser("inspect", help="describe an adapter file (type, ranks, blocks, base model, metadata)")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.set_defaults(func=_cmd_inspect)

    merge = sub.add_parser("merge", help="bake adapters into a base model (diffusers folder or single file)")
    merge.add_argument("--base", required=True, help="base model: diffusers folder, hub id or .safetensors")
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                       help="adapter and its weight (the <lora:name:w> multiplier); repeat for several")
    merge.add_argument("--out", required=True, help="a folder (diffusers format) or a .safetensors file")
    merge.add_argument("--config-dir", default="", help="diffusers folder with configs for a single-file base")
    merge.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=_cmd_merge)

    add_adapter_tool_commands(sub)
    add_captioning_commands(sub)
    add_caption_editor_command(sub)
    add_audit_command(sub)

    sample = sub.add_parser("sample", help="X/Y grid over adapter files x weights x CFG scales with fixed seeds "
                            "(run under accelerate launch to split the cells across processes)")
    sample.add_argument("base", help="base model: diffusers folder, hub id or .safetensors")
    sample.add_argument("adapters", nargs="+", help="adapter files, or run folders (all their adapter files)")
    sample.add_argument("--out", required=True, help="folder for the images and grid-NN.png per prompt")
    sample.add_argument("--weights", default="1", help="adapter weights, comma-separated, e.g. 0.4,0.8,1.2")
    sample.add_argument("--cfg", default="", help="CFG scales, comma-separated; default: each prompt's own")
    sample.add_argument("--prompt", action="append", default=[],
                        help="a prompt line in kohya's format ('a dlsks robot --n blurry --d 42 --s 28'); repeatable")
    sample.add_argument("--prompt-file", default="", help="kohya prompt file (.txt, .toml, .json)")
    sample.add_argument("--negative", default="", help="negative prompt of prompts that give none")
    sample.add_argument("--width", type=int, default=0, help="0: 512 (SD 1.x/2.x) or 1024 (SDXL)")
    sample.add_argument("--height", type=int, default=0, help="0: 512 (SD 1.x/2.x) or 1024 (SDXL)")
    sample.add_argument("--steps", type=int, default=30)
    sample.add_argument("--sampler", default="euler_a")
    sample.add_argument("--seed", type=int, default=-1, help="-1: the prompt's number")
    sample.add_argument("--config-dir", default="", help="diffusers folder with configs for a single-file base")
    sample.set_defaults(func=_cmd_sample)

    imp = sub.add_parser("import-kohya", help="a kohya_ss GUI config (.json) or sd-scripts --config_file (.toml) as "
                         "a recipe, its data commands and a report of every key")
    imp.add_argument("config", help="the kohya_ss .json or sd-scripts .toml")
    imp.add_argument("out", help="new folder for train.toml, prepare.sh and import_report.txt (and dataset.toml)")
    imp.add_argument("--dataset-config", default="",
                     help="sd-scripts dataset config (TOML with [[datasets]] and [[datasets.subsets]]); default: the "
                          "config's own dataset_config key, if set")
    imp.add_argument("--train-data-dir", default="", help="training images (kohya's <repeats>_<name> folders): "
                     "what a kohya_ss preset leaves out; wins over the config's train_data_dir")
    imp.add_argument("--reg-data-dir", default="", help="regularization images (kohya's reg_data_dir)")
    imp.add_argument("--pretrained", default="", help="base model (kohya's pretrained_model_name_or_path)")
    imp.add_argument("--output-dir", default="", help="where runs are written (kohya's output_dir)")
    imp.set_defaults(func=_cmd_import_kohya)

    ref = sub.add_parser("config-reference", help="print the config reference (markdown)")
    ref.set_defaults(func=_cmd_config_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 2 bad input; 3 stopped on non-finite values; 4 out of device memory (with
    advice); 75 checkpointed and stopped early
    (preemption signal or checkpoint.stop_at_step): run the same command again to resume."""
    from dist_lora.train.guards import NonFiniteRunError
    from dist_lora.train.memory import OUT_OF_MEMORY_EXIT_CODE, OutOfMemory
    from dist_lora.utils.stop_signals import PREEMPTED_EXIT_CODE, Preempted

    args = build_parser().parse_args(argv)
    if args.command in ("train", "cache"):
        from dist_lora.utils.stop_signals import StopSignals

        StopSignals.install()  # from here to exit, a stop signal is remembered, never fatal
    try:
        return int(args.func(args))
    except OutOfMemory as exc:
        print(f"dist-lora {args.command}: {exc}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT_CODE
    except _USER_ERRORS as exc:
        print(f"dist-lora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as stop:
        stop_file = os.environ.get("DIST_LORA_PREEMPTED_FILE", "")
        from dist_lora.parallel import launched_rank

        if stop_file and launched_rank() == 0:
            # For job scripts: launchers and srun may report another status than 75 once they have
            # ended the other ranks; this file says the stop was on purpose.
            from dist_lora.utils.files import write_text_atomic

            write_text_atomic(stop_file, f"{stop}\n")
        hint = "; resume with checkpoint.resume=latest" if args.command == "train" else ""
        print(f"dist-lora {args.command}: {stop}{hint}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteRunError as exc:
        print(f"dist-lora {args.command}: stopped: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
