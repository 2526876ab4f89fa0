"""Caption transforms applied each time a sample is read (kohya's shuffle_caption, keep_tokens, dropout).

The random draws of a sample come from a generator keyed by (seed, epoch, sample key), so a sample gets
the same caption wherever it lands in the epoch: on any rank, in any worker, before or after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionTransform:
    shuffle: bool = False  # shuffle the comma-separated tags after the first keep_tokens
    keep_tokens: int = 0  # leading tags that never move and are never dropped
    caption_dropout: float = 0.0  # probability that the whole caption becomes "" (unconditional sample)
    tag_dropout: float = 0.0  # probability that each movable tag is dropped
    trigger: str = ""  # kept as the first tag whatever the other settings

    @property
    def active(self) -> bool:
        return self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0

    @staticmethod
    def rng(seed: int, epoch: int, key: str) -> random.Random:
        return random.Random(f"caption/{seed}/{epoch}/{key}")

    def __call__(self, caption: str, rng: random.Random) -> str:
        if not self.active:
            return caption
        # Draw the dropout decision first and always, so the later draws do not depend on its outcome.
        drop_all = rng.random() < self.caption_dropout
        if drop_all:
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
