"""Caption transforms applied each time a sample is read (kohya's shuffle_caption, keep_tokens, dropout).

The random draws of a sample come from a generator keyed by (seed, epoch, sample key), so a sample gets
the same caption wherever it lands in the epoch: on any rank, in any worker, before or after a resume.

A dataset prepared from a kohya dataset config records the caption options each subset set itself
(``manifest.json`` "subsets"); those apply to that subset's samples, and the training config's data.*
options fill in the rest, as sd-scripts lets its command line fill in what the dataset config leaves out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dist_lora.data.per_subset import PerSubset


@dataclass(frozen=True)
class CaptionTransform:
    shuffle: bool = False  # shuffle the comma-separated tags after the first keep_tokens
    keep_tokens: int = 0  # leading tags that never move and are never dropped
    caption_dropout: float = 0.0  # probability that the whole caption becomes "" (unconditional sample)
    tag_dropout: float = 0.0  # probability that each movable tag is dropped
    trigger: str = ""  # kept as the first tag whatever the other settings
    dropout_every_n_epochs: int = 0  # every N-th epoch (1-based, as kohya counts) trains without captions

    @property
    def active(self) -> bool:
        return self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0 or self.dropout_every_n_epochs > 0

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
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        fixed, movable = tags[: self.keep_tokens], tags[self.keep_tokens:]
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
        return ", ".join(fixed + movable)


CaptionPolicy = PerSubset[CaptionTransform]
