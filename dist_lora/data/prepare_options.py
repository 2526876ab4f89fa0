"""What `dist-lora prepare` is asked to do (its options) and what it did (its report)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dist_lora.data.audit import DEFAULT_HASH_DISTANCE, AuditReport
from dist_lora.data.buckets import BucketSpec
from dist_lora.data.images import DEFAULT_MAX_PIXELS
from dist_lora.data.kohya import SourceImage


@dataclass
class PrepareOptions:
    resolution: int = 512  # bucket base side (SD 1.x: 512, SDXL: 1024), or the square side without buckets
    trigger: str = ""
    shard_size: int = 1000  # samples per shard at most
    image_format: str = "png"
    overwrite: bool = False
    buckets: bool = True
    min_bucket_side: int = 0  # 0: resolution / 2
    max_bucket_side: int = 0  # 0: resolution * 2
    max_bucket_area: int = 0  # 0: resolution ** 2
    bucket_step: int = 64
    min_side: int = 0  # images whose shorter side is below this are rejected; 0: resolution / 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    reg_src: str = ""  # kohya regularization folder (prior preservation), same <repeats>_<class> layout
    workers: int = 0  # decode processes; 0: one per core
    val_fraction: float = 0.0  # images held out for validation loss, written to <out>/val (repeats 1)
    no_upscale: bool = False  # kohya's bucket_no_upscale: buckets from each image's own size, never enlarged
    random_crop: bool = False  # store images uncropped; the loader crops them at a drawn offset each epoch
    alpha_mask: bool = False  # keep each image's transparency as its loss mask (kohya's alpha_mask)
    mask_dir: str = ""  # mask images (their red channel) for masked loss, mirroring the source folder's layout
    caption_extension: str = ".caption"  # of a dataset config's subsets that set none (sd-scripts' default)
    wildcard: bool = False  # captions keep every line: one is chosen (and {a|b} expanded) per epoch
    audit_distance: int = DEFAULT_HASH_DISTANCE  # perceptual-hash bits within which images are near-duplicates
    tokenizer: str = ""  # a CLIP tokenizer (or diffusers) folder: the audit then counts caption tokens
    max_token_length: int = 75  # what the text encoder reads (kohya's max_token_length: 75, 150, 225)
    # A dataset config's subsets whose datasets set their own resolution / bucket settings (one dict of
    # these fields per subset, empty where none): several bucket sets in one prepared folder.
    subset_buckets: tuple[dict[str, Any], ...] = ()

    def for_image(self, image: SourceImage) -> PrepareOptions:
        """The options ``image`` is encoded with: its subset's bucket settings over these."""
        if image.subset is None or image.subset >= len(self.subset_buckets) or not self.subset_buckets[image.subset]:
            return self
        return replace(self, **self.subset_buckets[image.subset], subset_buckets=())

    def resolutions(self) -> list[int]:
        """The base sides the images are bucketed at."""
        return sorted({b.get("resolution", self.resolution) for b in self.subset_buckets} or {self.resolution})

    def bucket_spec(self) -> BucketSpec:
        if not self.buckets:
            return BucketSpec(self.resolution, self.resolution, self.resolution, self.resolution ** 2,
                              self.bucket_step)
        return BucketSpec.for_base(self.resolution, min_side=self.min_bucket_side, max_side=self.max_bucket_side,
                                   max_area=self.max_bucket_area, step=self.bucket_step)

    def encoding_fingerprint(self) -> dict[str, Any]:
        """What changes every encoded image; a re-run reuses images only when this is unchanged (and each
        image's own options, recorded with it)."""
        return {"buckets": asdict(self.bucket_spec()), "image_format": self.image_format,
                **({"no_upscale": True} if self.no_upscale and self.buckets else {})}

    @property
    def effective_min_side(self) -> int:
        return self.min_side or max(1, self.resolution // 4)


@dataclass
class PrepareReport:
    found: int = 0
    accepted: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    shards: int = 0
    samples_with_repeats: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    validation: PrepareReport | None = None  # the held-out set's own report (--val-fraction)
    processes: list[int] = field(default_factory=list)  # images each process read (train and val), when several
    audit: AuditReport | None = None  # training, validation and regularization images together

    def add_counts(self, other: PrepareReport) -> None:
        """Count ``other`` (another process's share of the same split) in."""
        self.found += other.found
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.warnings += other.warnings
        self.encoded += other.encoded
        self.reused += other.reused

    def to_json(self) -> dict[str, Any]:
        return {"found": self.found, "accepted": self.accepted, "rejected_count": len(self.rejected),
                "encoded": self.encoded, "reused": self.reused, "shards": self.shards,
                "samples_with_repeats": self.samples_with_repeats, "buckets": self.buckets,
                "rejected": self.rejected, "warnings": self.warnings, "seconds": round(self.seconds, 3),
                **({"processes": self.processes} if len(self.processes) > 1 else {}),
                **({"validation": self.validation.to_json()} if self.validation else {}),
                **({"audit": self.audit.to_json()} if self.audit else {})}

    def summary(self) -> str:
        reasons = Counter(r["reason"].split(":")[0] for r in self.rejected)
        lines = [f"found {self.found} images: {self.accepted} accepted, {len(self.rejected)} rejected "
                 f"({self.encoded} encoded, {self.reused} reused unchanged); {self.shards} shards in "
                 f"{len(self.buckets)} buckets, {self.samples_with_repeats} samples per epoch with repeats "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  rejected {n} x {reason}" for reason, n in sorted(reasons.items())]
        lines += [f"  rejected {r['path']}: {r['reason']}" for r in self.rejected]
        lines += [f"  warning {w['path']}: {w['warning']}" for w in self.warnings]
        if self.validation is not None:
            lines.append(f"held out for validation (in val/): {self.validation.accepted} images in "
                         f"{self.validation.shards} shards")
        if self.audit is not None:
            lines += self.audit.summary()
        return "\n".join(lines)

