"""Caption transforms applied each time a sample is read (kohya's shuffle_caption, keep_tokens, dropout).

The random draws of a sample come from a generator keyed by (seed, epoch, sample key), so a sample gets
the same caption wherever it lands in the epoch: on any rank, in any worker, before or after a resume.

A dataset prepared from a kohya dataset config records the caption options each subset set itself
(``manifest.json`` "subsets"); those apply to that subset's samples, and the training config's data.*
options fill in the rest, as sd-scripts lets its command line fill in what the dataset config leaves out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dist_lora.data.per_subset import PerSubset

if TYPE_CHECKING:
    from dist_lora.config import DataConfig
    from dist_lora.data.manifest import Manifest

_WILDCARD = re.compile(r"\{([^}]+)\}")


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(frozen=True)
class CaptionTransform:
    shuffle: bool = False  # shuffle the comma-separated tags after the first keep_tokens
    keep_tokens: int = 0  # leading tags that never move and are never dropped
    caption_dropout: float = 0.0  # probability that the whole caption becomes "" (unconditional sample)
    tag_dropout: float = 0.0  # probability that each movable tag is dropped
    trigger: str = ""  # kept as the first tag whatever the other settings
    dropout_every_n_epochs: int = 0  # every N-th epoch (1-based, as kohya counts) trains without captions
    # Where a caption holds it, the tags before it (and after a second one) are fixed instead of the first
    # keep_tokens; the separator itself never reaches the text encoder.
    keep_tokens_separator: str = ""
    secondary_separator: str = ""  # joins the words of one tag; made a comma once the tags are placed
    wildcard: bool = False  # one of the caption's lines, and one option of each {a|b|c} (kohya: enable_wildcard)

    @classmethod
    def from_options(cls, data: DataConfig, trigger: str = "") -> CaptionTransform:
        """The training config's data.* caption options."""
        return cls(data.shuffle_caption, data.keep_tokens, data.caption_dropout, data.tag_dropout, trigger,
                   data.caption_dropout_every_n_epochs, data.keep_tokens_separator, data.secondary_separator)

    @property
    def active(self) -> bool:
        return (self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0 or self.dropout_every_n_epochs > 0
                or bool(self.keep_tokens_separator) or bool(self.secondary_separator) or self.wildcard)

    @staticmethod
    def rng(seed: int, epoch: int, key: str) -> random.Random:
        return random.Random(f"caption/{seed}/{epoch}/{key}")

    def __call__(self, caption: str, rng: random.Random, epoch: int = 0) -> str:
        if not self.active:
            return caption
        # Draw the dropout decision first and always, so the later draws do not depend on its outcome.
        drop_all = rng.random() < self.caption_dropout
        every = self.dropout_every_n_epochs
        if drop_all or (every > 0 and (epoch + 1) % every == 0):
            return ""
        if self.wildcard:
            caption = expand_wildcards(caption, rng)
        fixed, movable, fixed_end = self._split(caption)
        if self.trigger and self.trigger in movable:
            movable.remove(self.trigger)
            fixed.insert(0, self.trigger)
        elif self.trigger and self.trigger in fixed:
            fixed.remove(self.trigger)
            fixed.insert(0, self.trigger)
        if self.tag_dropout > 0:
            movable = [t for t in movable if rng.random() >= self.tag_dropout]
        if self.shuffle:
            rng.shuffle(movable)
        text = ", ".join(fixed + movable + fixed_end)
        return text.replace(self.secondary_separator, ",") if self.secondary_separator else text

    def _split(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """The fixed leading tags, the movable ones and the fixed trailing ones, as sd-scripts splits them."""
        separator = self.keep_tokens_separator
        if separator and separator in caption:
            head, rest = caption.split(separator, 1)
            movable, tail = rest.split(separator, 1) if separator in rest else (rest, "")
            return _tags(head), _tags(movable.replace(separator, ",")), _tags(tail.replace(separator, ","))
        tags = _tags(caption)
        return tags[: self.keep_tokens], tags[self.keep_tokens:], []


CaptionPolicy = PerSubset[CaptionTransform]


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """sd-scripts' enable_wildcard: one of the caption's lines, then one option of each ``{a|b|c}``;
    ``{{`` and ``}}`` stand for literal braces."""
    line = rng.choice(caption.split("\n")) if "\n" in caption else caption
    # Literal braces become characters the text cannot hold for the substitution, as sd-scripts does.
    left, right = "\x00", "\x01"
    line = line.replace("{{", left).replace("}}", right)
    line = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), line)
    return line.replace(left, "{").replace(right, "}")


def caption_policy(data: DataConfig, manifest: Manifest) -> CaptionPolicy:
    """The caption transform of each sample: its subset's options, else data.*; wildcards where the data was
    prepared with them (their captions keep every line)."""
    default = replace(CaptionTransform.from_options(data, manifest.trigger), wildcard=manifest.wildcard_captions)
    return CaptionPolicy.build(default, manifest.subset_options("captions"))


def wildcards_only(policy: CaptionPolicy) -> CaptionPolicy:
    """Each sample's wildcard choice alone, without shuffling or dropout: for evaluation, whose loader reads
    epoch 0 every time, so a sample's caption is the same at every evaluation."""
    return CaptionPolicy(CaptionTransform(wildcard=policy.default.wildcard),
                         tuple(CaptionTransform(wildcard=t.wildcard) for t in policy.subsets))
