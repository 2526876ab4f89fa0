"""`dist-lora audit`: the audit `prepare` writes into report.json, for a source dataset before (or without)
preparing it: the same images, captions, validation split and regularization set prepare would use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dist_lora.data.audit import AuditItem, AuditReport, audit, file_hash, load_tokenizer
from dist_lora.data.dataset_config import DatasetSpec
from dist_lora.data.images import RejectedImage
from dist_lora.data.kohya import DatasetFolderError, read_caption
from dist_lora.data.prepare_options import PrepareOptions
from dist_lora.data.prepare_sources import scan_sources, split_validation


def audit_dataset(src: str | Path | None, opts: PrepareOptions, dataset: DatasetSpec | None = None
                  ) -> tuple[AuditReport, list[dict[str, str]]]:
    """The audit of ``src`` (a kohya folder) or ``dataset``; with the images that could not be read."""
    if dataset is not None:
        opts = replace(opts, **dataset.prepare)
    elif src is None:
        raise DatasetFolderError("give a dataset folder or a dataset config (--dataset-config).")
    images = scan_sources(Path(src) if src is not None else dataset.path, opts, dataset)  # type: ignore[union-attr]
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None
    train, val = split_validation(images, opts.val_fraction)
    items, unreadable = [], []
    for split, group in (("train", train), ("val", val)):
        for image in group:
            try:
                phash = file_hash(image.path)
            except RejectedImage as exc:
                unreadable.append({"path": image.relative, "reason": str(exc)})
                continue
            items.append(AuditItem(image.relative, "reg" if image.is_reg else split, phash,
                                   read_caption(image, "")[0]))
    report = audit(items, trigger=opts.trigger, max_distance=opts.audit_distance, tokenizer=tokenizer,
                   max_tokens=opts.max_token_length)
    return report, unreadable
