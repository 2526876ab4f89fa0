"""The adapter-file tools of `dist-lora`: resize, merge-lora, extract and verify (parse, call, report)."""

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


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from dist_lora.adapters.loaders.fix import fix_file
    from dist_lora.adapters.loaders.verify import format_verification, parse_uis, verify_file

    uis = parse_uis(args.ui)
    result = verify_file(args.file, uis, args.family, args.base)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_verification(result, args.verbose))
    if not args.fix:
        return 0 if result.ok else 1
    fixed = fix_file(args.file, args.fix, args.family, args.base, args.overwrite)
    print(f"wrote {args.fix}: {fixed.modules} modules in the kohya layout ({fixed.renamed} renamed, "
          f"{fixed.alphas_from_peft} alphas from the peft config, {fixed.dora_reshaped} DoRA magnitudes reshaped, "
          f"{fixed.lokr_rewritten} LoKr convolution factors written whole)")
    if fixed.alphas_added:
        print(f"  {fixed.alphas_added} modules had no alpha: written with alpha = rank (scale 1, what every loader "
              f"applies without one)")
    after = verify_file(args.fix, uis, result.parsed.family, args.base)
    print(format_verification(after, args.verbose))
    return 0 if after.ok else 1


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

    verify = sub.add_parser("verify", help="which keys of an adapter file each UI loads into which module, which it "
                            "leaves out and why; --fix writes the layout they all read")
    verify.add_argument("file", help="any LoRA/LyCORIS .safetensors (kohya, LyCORIS, diffusers/peft, "
                        "SimpleTuner, ai-toolkit)")
    verify.add_argument("--ui", default="all", help="a1111, comfyui, diffusers, kohya (comma-separated) or all")
    verify.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default=None,
                        help="the base model (default: from the file's metadata, else its keys and shapes)")
    verify.add_argument("--base", default=None, help="diffusers folder of the model (its config files only): for "
                        "UNets and text encoders other than the published SD 1.5 / 2.1 / SDXL ones")
    verify.add_argument("--fix", default=None, metavar="OUT",
                        help="write the file in the kohya layout (names, alphas and DoRA shapes only; the math is "
                             "unchanged) and verify that")
    verify.add_argument("--json", action="store_true", help="the full report (every key) as JSON")
    verify.add_argument("--verbose", action="store_true", help="list every left-out key")
    verify.add_argument("--overwrite", action="store_true", help="replace an existing --fix file")
    verify.set_defaults(func=_cmd_verify)
