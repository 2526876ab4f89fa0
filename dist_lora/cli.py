"""`dist-lora`: thin command line over the library (parse, call, report)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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
                          image_format=args.image_format, overwrite=args.overwrite)
    report = prepare_dataset(args.src, args.out, opts)
    print(report.summary())
    print(f"shards, manifest.json and report.json in {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dist_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    from dist_lora.train.trainer import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"adapter: {result.adapter_path}\nconfig: {result.config_path}\nmetrics: {result.metrics_path}\n"
              f"loss: {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} steps")
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

    prep = sub.add_parser("prepare", help="kohya folder (<repeats>_<name>/img.png + img.txt) -> WebDataset shards")
    prep.add_argument("src")
    prep.add_argument("out")
    prep.add_argument("--resolution", type=int, default=512)
    prep.add_argument("--trigger", default="", help="trigger word put first in every caption")
    prep.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    prep.add_argument("--image-format", choices=["png", "jpg"], default="png")
    prep.add_argument("--overwrite", action="store_true")
    prep.set_defaults(func=_cmd_prepare)

    tr = sub.add_parser("train", help="train an adapter (run under `accelerate launch` for several processes)")
    tr.add_argument("--config", default=None, help="TOML recipe, e.g. configs/tiny_sdxl.toml")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=100")
    tr.set_defaults(func=_cmd_train)

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

    ref = sub.add_parser("config-reference", help="print the config reference (markdown)")
    ref.set_defaults(func=_cmd_config_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 2 bad input; 3 stopped on non-finite values; 75 checkpointed and stopped early
    (preemption signal or checkpoint.stop_at_step): run the same command again to resume."""
    from dist_lora.train.guards import PREEMPTED_EXIT_CODE, NonFiniteRunError, Preempted

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _USER_ERRORS as exc:
        print(f"dist-lora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"dist-lora {args.command}: {stop}; resume with checkpoint.resume=latest", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteRunError as exc:
        print(f"dist-lora {args.command}: stopped: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
