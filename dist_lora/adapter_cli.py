"""The adapter-file tools of `dist-lora`: resize and merge-lora (parse, call, report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dist_lora.errors import DistLoraError


def _cmd_resize(args: argparse.Namespace) -> int:
    from dist_lora.adapters.resize import ResizeRule, resize_file, summary

    rule = ResizeRule(args.rank, args.conv_rank or args.rank, args.dynamic, args.dynamic_param)
    reports = resize_file(args.input, args.output, rule, save_precision=args.save_precision, base=args.base,
                          overwrite=args.overwrite)
    if args.verbose:
        for report in reports:
            print(report.line())
    print(summary(reports))
    print(f"wrote {args.output}")
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from dist_lora.adapters.merge_lora import MergeInput, MergeOptions, merge_lora_files
    from dist_lora.merge_cli import parse_weighted

    if args.lbws and len(args.lbws) != len(args.files):
        raise DistLoraError(f"--lbws gives {len(args.lbws)} lists for {len(args.files)} files; give one per file, "
                            f"in the same order (kohya's --lbws).")
    blocks = args.lbws or [None] * len(args.files)
    inputs = [MergeInput(Path(path), weight, block)
              for (path, weight), block in zip(map(parse_weighted, args.files), blocks, strict=True)]
    options = MergeOptions(args.mode, args.rank, args.conv_rank, args.clamp_quantile, args.save_precision, args.base,
                           args.overwrite)
    ranks = merge_lora_files(inputs, args.out, options)
    values = sorted(set(ranks.values()))
    print(f"merged {len(inputs)} files into {len(ranks)} modules, rank {values[0]}"
          + (f"-{values[-1]}" if len(values) > 1 else ""))
    print(f"wrote {args.out}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from dist_lora.adapters.extract import ExtractOptions, extract_lora

    options = ExtractOptions(args.rank, args.conv_rank, args.clamp_quantile, args.min_diff, args.preset,
                             args.config_dir, args.load_precision, args.save_precision, args.overwrite)
    report = extract_lora(args.base, args.tuned, args.out, options)
    text = ("text encoders included" if report.text_encoders else
            f"text encoders left out (largest change {report.largest_text_diff:.3g} <= --min-diff {args.min_diff})")
    print(f"extracted {report.modules} modules ({report.unchanged} unchanged, not written); {text}")
    print(f"wrote {args.out}")
    return 0


def add_adapter_tool_commands(sub: Any) -> None:
    """Register the commands on the main parser's subparsers."""
    resize = sub.add_parser("resize", help="re-approximate every module of an adapter file at a new rank by SVD "
                            "(kohya's resize_lora; LoHa/LoKr are written as LoRA)")
    resize.add_argument("input", help="adapter .safetensors (ours, kohya's or LyCORIS')")
    resize.add_argument("output", help="the resized .safetensors")
    resize.add_argument("--rank", type=int, required=True,
                        help="new rank; with --dynamic the most any module gets (kohya's --new_rank)")
    resize.add_argument("--conv-rank", type=int, default=0,
                        help="new rank of k x k convolutions (kohya's --new_conv_rank; default --rank)")
    resize.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"], default=None,
                        help="choose each module's rank from its singular values (kohya's --dynamic_method)")
    resize.add_argument("--dynamic-param", type=float, default=None,
                        help="sv_ratio: largest / smallest kept singular value; sv_fro, sv_cumulative: the "
                             "fraction of the Frobenius norm / of the singular values' sum to keep")
    resize.add_argument("--base", default=None, help="diffusers folder of the model it was trained on (its "
                        "unet/config.json only): needed for LyCORIS files of non-standard UNets")
    resize.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    resize.add_argument("--verbose", action="store_true", help="each module's retained energy, as kohya prints it")
    resize.add_argument("--overwrite", action="store_true")
    resize.set_defaults(func=_cmd_resize)

    merge_lora = sub.add_parser("merge-lora", help="several adapter files (each at a weight) as one LoRA: "
                                "concatenated (exact) or SVD-merged at a rank (kohya's svd_merge_lora)")
    merge_lora.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]", help="adapter files and their weights")
    merge_lora.add_argument("--out", required=True, help="the merged .safetensors")
    merge_lora.add_argument("--mode", choices=["concat", "svd"], default="svd",
                            help="concat: ranks add up, exact; svd: the sum re-approximated at --rank")
    merge_lora.add_argument("--rank", type=int, default=0, help="rank of the SVD merge (kohya's --new_rank)")
    merge_lora.add_argument("--conv-rank", type=int, default=0,
                            help="rank of k x k convolutions in the SVD merge (default --rank)")
    merge_lora.add_argument("--lbws", nargs="*", default=None, metavar="LIST",
                            help="per-block weights, one list per file (kohya's --lbws; 17 or 26 numbers for "
                                 "SD 1.x/2.x, 12 or 20 for SDXL, BASE first)")
    merge_lora.add_argument("--clamp-quantile", type=float, default=1.0,
                            help="clamp the SVD factors at this quantile (kohya: 0.99; default 1, none)")
    merge_lora.add_argument("--base", default=None, help="diffusers folder of the base model (unet/config.json "
                            "only): needed for LyCORIS files of non-standard UNets")
    merge_lora.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    merge_lora.add_argument("--overwrite", action="store_true")
    merge_lora.set_defaults(func=_cmd_merge_lora)

    extract = sub.add_parser("extract", help="a LoRA approximating a fine-tune's change to its base, by SVD per "
                             "module (kohya's extract_lora_from_models)")
    extract.add_argument("--base", required=True, help="the original model: diffusers folder or .safetensors")
    extract.add_argument("--tuned", required=True, help="the fine-tuned model: diffusers folder or .safetensors")
    extract.add_argument("--out", required=True, help="the LoRA .safetensors")
    extract.add_argument("--rank", type=int, required=True, help="rank of every module (kohya's --dim)")
    extract.add_argument("--conv-rank", type=int, default=0,
                         help="extract resnet and sampler convolutions too, at this rank (kohya's --conv_dim)")
    extract.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp the factors at this quantile "
                         "(kohya's --clamp_quantile; 1: none)")
    extract.add_argument("--min-diff", type=float, default=0.01, help="leave the text encoders out unless a weight "
                         "of theirs changed by more (kohya's --min_diff)")
    extract.add_argument("--preset", choices=["attn_ff", "attn", "full"], default="attn_ff",
                         help="the UNet modules to extract (network.preset's meaning)")
    extract.add_argument("--config-dir", default="", help="diffusers folder with configs for single-file models")
    extract.add_argument("--load-precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                         help="precision the models load in (auto: as the base's UNet is stored)")
    extract.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    extract.add_argument("--overwrite", action="store_true")
    extract.set_defaults(func=_cmd_extract)
