"""The dataset tools of `dist-lora`: tag, captions and audit (parse, call, report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _tag_list(value: str, separator: str) -> list[str]:
    return [t.strip() for t in value.split(separator.strip() or ",") if t.strip()]


def _cmd_tag(args: argparse.Namespace) -> int:
    from dist_lora.captioning.files import CaptionFiles
    from dist_lora.captioning.tagging import tag_folder
    from dist_lora.captioning.wd14 import TagOptions
    from dist_lora.parallel import launched_rank, shutdown

    general = args.thresh if args.general_threshold is None else args.general_threshold
    character = args.thresh if args.character_threshold is None else args.character_threshold
    opts = TagOptions(general, character, frozenset(_tag_list(args.undesired_tags, args.caption_separator)),
                      tuple(_tag_list(args.always_first_tags, args.caption_separator)), args.remove_underscore,
                      args.use_rating_tags, args.use_rating_tags_as_last_tag, args.character_tags_first)
    files = CaptionFiles(args.caption_extension, args.overwrite, args.append_tags, args.caption_separator)
    try:
        report = tag_folder(args.src, args.model, opts, files, batch_size=args.batch_size, recursive=args.recursive,
                            progress=not args.no_progress)
    finally:
        shutdown()
    if launched_rank() != 0:
        return 0
    print(f"tagged {report.captioned} images of {report.images} ({report.kept} already captioned, kept; "
          f"{len(report.unreadable)} unreadable, skipped)")
    for bad in report.unreadable:
        print(f"  unreadable {bad['path']}: {bad['reason']}")
    shown = report.frequency.most_common(None if args.frequency_tags else 20)
    if shown:
        print(("tag frequency:" if args.frequency_tags else "most frequent tags:") + "".join(
            f"\n  {tag}: {count}" for tag, count in shown))
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from dist_lora.captioning.captioner import CaptionOptions, caption_folder
    from dist_lora.captioning.files import CaptionFiles
    from dist_lora.parallel import launched_rank, shutdown

    opts = CaptionOptions(args.prompt, args.prefix, args.suffix, args.num_beams, args.max_length, args.min_length,
                          args.batch_size)
    files = CaptionFiles(args.caption_extension, args.overwrite, False, ", ")
    try:
        report = caption_folder(args.src, args.model, opts, files, recursive=args.recursive,
                                progress=not args.no_progress)
    finally:
        shutdown()
    if launched_rank() == 0:
        print(f"captioned {report.captioned} images of {report.images} ({report.kept} already captioned, kept; "
              f"{len(report.unreadable)} unreadable, skipped)")
        for bad in report.unreadable:
            print(f"  unreadable {bad['path']}: {bad['reason']}")
    return 0


def add_captioning_commands(sub: Any) -> None:
    """Register the commands on the main parser's subparsers (kohya's option names are accepted too)."""
    tag = sub.add_parser("tag", help="tag a folder of images with a WD14 tagger (ONNX; kohya's "
                         "tag_images_by_wd14_tagger), writing a caption file beside each")
    tag.add_argument("src", help="folder of images")
    tag.add_argument("--model", default="SmilingWolf/wd-vit-tagger-v3",
                     help="folder with model.onnx and selected_tags.csv, or a hub id (downloaded when online)")
    tag.add_argument("--batch-size", "--batch_size", type=int, default=8)
    tag.add_argument("--thresh", type=float, default=0.35, help="threshold of both tag kinds (kohya's --thresh)")
    tag.add_argument("--general-threshold", "--general_threshold", type=float, default=None,
                     help="threshold of general tags (default --thresh)")
    tag.add_argument("--character-threshold", "--character_threshold", type=float, default=None,
                     help="threshold of character tags (default --thresh)")
    tag.add_argument("--undesired-tags", "--undesired_tags", default="",
                     help="tags never written, separated by the caption separator")
    tag.add_argument("--always-first-tags", "--always_first_tags", default="",
                     help="tags moved to the front when found (the last listed ends up first, as in kohya)")
    tag.add_argument("--remove-underscore", "--remove_underscore", action="store_true",
                     help="write tags with spaces (tags of 3 characters or fewer, emoticons, are kept)")
    tag.add_argument("--caption-separator", "--caption_separator", default=", ")
    tag.add_argument("--caption-extension", "--caption_extension", default=".txt")
    tag.add_argument("--use-rating-tags", "--use_rating_tags", action="store_true",
                     help="put the most likely rating tag first")
    tag.add_argument("--use-rating-tags-as-last-tag", "--use_rating_tags_as_last_tag", action="store_true",
                     help="put the most likely rating tag last")
    tag.add_argument("--character-tags-first", "--character_tags_first", action="store_true")
    tag.add_argument("--append-tags", "--append_tags", action="store_true",
                     help="add the tags an existing caption lacks, after its own")
    tag.add_argument("--overwrite", action="store_true", help="replace existing captions")
    tag.add_argument("--recursive", action="store_true", help="tag the images of subfolders too")
    tag.add_argument("--frequency-tags", "--frequency_tags", action="store_true",
                     help="print every tag's frequency (else the 20 most frequent)")
    tag.add_argument("--report", default="", help="write the counts, unreadable images and frequencies as JSON")
    tag.add_argument("--no-progress", action="store_true", help="no progress bar")
    tag.set_defaults(func=_cmd_tag)

    caption = sub.add_parser("caption", help="describe a folder's images in words with BLIP or Florence-2 "
                             "(kohya's make_captions), writing a caption file beside each")
    caption.add_argument("src", help="folder of images")
    caption.add_argument("--model", default="Salesforce/blip-image-captioning-large",
                         help="BLIP or Florence-2: a transformers folder or a hub id")
    caption.add_argument("--prompt", default="", help="BLIP: text the caption continues ('a photo of'); Florence-2: "
                         "its task (<CAPTION>, <DETAILED_CAPTION>, default <MORE_DETAILED_CAPTION>)")
    caption.add_argument("--prefix", default="", help="put before every caption (e.g. the trigger and a comma)")
    caption.add_argument("--suffix", default="", help="put after every caption")
    caption.add_argument("--num-beams", "--num_beams", type=int, default=1, help="beam search width (1: greedy)")
    caption.add_argument("--max-length", "--max_length", type=int, default=75, help="tokens at most")
    caption.add_argument("--min-length", "--min_length", type=int, default=5, help="tokens at least (BLIP)")
    caption.add_argument("--batch-size", "--batch_size", type=int, default=1)
    caption.add_argument("--caption-extension", "--caption_extension", default=".caption",
                         help="kohya's make_captions default: .caption")
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions")
    caption.add_argument("--recursive", action="store_true", help="caption the images of subfolders too")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.set_defaults(func=_cmd_caption)


def _cmd_captions(args: argparse.Namespace) -> int:
    from dist_lora.captioning.editor import (
        CaptionSet,
        TagEdit,
        compile_pattern,
        dataset_config_sets,
        edit_captions,
    )
    from dist_lora.errors import DistLoraError

    if bool(args.src) == bool(args.dataset_config):
        raise DistLoraError("give a caption folder or --dataset-config (its image-folder subsets), not both.")
    edit = TagEdit(tuple(tuple(pair) for pair in args.replace),
                   tuple((compile_pattern(p, "--replace-regex"), r) for p, r in args.replace_regex),
                   frozenset(args.remove), tuple(compile_pattern(p, "--remove-regex") for p in args.remove_regex),
                   tuple(args.add), args.dedupe, args.trigger)
    if not edit.changes_anything and not args.list:
        raise DistLoraError("nothing to do: give an edit (--add, --remove, --replace, --trigger, --dedupe, ...) "
                            "or --list.")
    sets = dataset_config_sets(args.dataset_config, args.caption_extension) if args.dataset_config else \
        [CaptionSet(Path(args.src), args.caption_extension, args.recursive)]
    report = edit_captions(sets, edit, separator=args.separator, dry_run=args.dry_run or not edit.changes_anything)
    if args.dry_run:
        print("\n".join(report.diff))
    verb = "would change" if args.dry_run else "changed"
    if edit.changes_anything:
        print(f"{verb} {report.changed} of {report.files} caption files")
    if args.list:
        print("tag frequency:" + "".join(f"\n  {tag}: {n}" for tag, n in report.frequency.most_common()))
    return 0


def add_caption_editor_command(sub: Any) -> None:
    captions = sub.add_parser("captions", help="edit caption files: replace, remove and add tags (exact or regex), "
                              "de-duplicate, put the trigger first, list frequencies")
    captions.add_argument("src", nargs="?", default="", help="folder of images with caption files")
    captions.add_argument("--dataset-config", default="", help="edit the captions of this dataset config's subsets")
    captions.add_argument("--caption-extension", default=".txt",
                          help="caption files' extension (a dataset config's subsets may set their own)")
    captions.add_argument("--separator", default=", ", help="between tags (kohya's caption_separator)")
    captions.add_argument("--recursive", action="store_true")
    captions.add_argument("--add", action="append", default=[], metavar="TAG", help="add where missing (repeatable)")
    captions.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove this tag")
    captions.add_argument("--remove-regex", action="append", default=[], metavar="RE",
                          help="remove tags that match RE entirely")
    captions.add_argument("--replace", action="append", nargs=2, default=[], metavar=("OLD", "NEW"),
                          help="replace the tag OLD by NEW")
    captions.add_argument("--replace-regex", action="append", nargs=2, default=[], metavar=("RE", "REPL"),
                          help="re.sub(RE, REPL) on every tag (an empty result removes it)")
    captions.add_argument("--trigger", default="", help="put this tag first (added where missing)")
    captions.add_argument("--dedupe", action="store_true", help="drop repeated tags, keeping the first")
    captions.add_argument("--list", action="store_true", help="print every tag's frequency (after the edit)")
    captions.add_argument("--dry-run", action="store_true", help="print the changes as a diff; write nothing")
    captions.set_defaults(func=_cmd_captions)


def _cmd_audit(args: argparse.Namespace) -> int:
    from dist_lora.data.audit_source import audit_dataset
    from dist_lora.data.prepare import PrepareOptions
    from dist_lora.errors import DistLoraError

    dataset = None
    if args.dataset_config:
        from dist_lora.data.dataset_config import read_dataset_config

        if args.src:
            raise DistLoraError(f"give a dataset folder ('{args.src}') or --dataset-config, not both.")
        dataset = read_dataset_config(args.dataset_config)
    opts = PrepareOptions(trigger=args.trigger, reg_src=args.reg, val_fraction=args.val_fraction,
                          caption_extension=args.caption_extension, audit_distance=args.audit_distance,
                          tokenizer=args.tokenizer, max_token_length=args.max_token_length)
    report, unreadable = audit_dataset(args.src or None, opts, dataset)
    if args.json:
        print(json.dumps({**report.to_json(), "unreadable": unreadable}, indent=1, ensure_ascii=False))
    else:
        print("\n".join(report.summary()))
        for bad in unreadable:
            print(f"  unreadable {bad['path']}: {bad['reason']}")
    return 0


def add_audit_options(parser: Any) -> None:
    """The audit's options, shared by `prepare` and `audit`."""
    parser.add_argument("--audit-distance", type=int, default=4,
                        help="perceptual-hash bits (of 64) within which two images count as near-duplicates")
    parser.add_argument("--tokenizer", default="", help="CLIP tokenizer folder (or a diffusers model folder): "
                        "the audit then reports captions longer than --max-token-length")
    parser.add_argument("--max-token-length", type=int, default=75, choices=[75, 150, 225],
                        help="caption tokens the text encoder reads (kohya's max_token_length)")


def add_audit_command(sub: Any) -> None:
    audit = sub.add_parser("audit", help="near-duplicate images, train/val leakage, train/reg duplicates, captions "
                           "without the trigger or over the token limit, tag coverage (what prepare reports)")
    audit.add_argument("src", nargs="?", default="", help="kohya folder (<repeats>_<name>/...)")
    audit.add_argument("--dataset-config", default="", help="an sd-scripts dataset config instead of SRC")
    audit.add_argument("--reg", default="", help="regularization folder (kohya layout)")
    audit.add_argument("--val-fraction", type=float, default=0.0, help="the validation split prepare would hold out")
    audit.add_argument("--trigger", default="", help="report captions without this tag")
    audit.add_argument("--caption-extension", default=".caption", help="of a dataset config's subsets that set none")
    audit.add_argument("--json", action="store_true", help="the full report as JSON")
    add_audit_options(audit)
    audit.set_defaults(func=_cmd_audit)
